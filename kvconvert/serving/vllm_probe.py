"""Run one model folder in vLLM and report what it did, as JSON (a standalone script).

    python vllm_probe.py REQUEST.json RESULT.json

This file imports only vLLM, the standard library and ``protocol.py`` beside it:
``kvconvert check --engine vllm`` and ``benchmarks/vllm_check.py`` run it with the interpreter
of the environment where vLLM is installed (``--python``), which need not have kvconvert.
The request says what to do:

- ``folder``, ``dtype``, ``max_model_len``, ``kv_space_gib`` (whole GiB of KV cache:
  ``VLLM_CPU_KVCACHE_SPACE`` on CPU, ``kv_cache_memory_bytes`` on GPU),
  ``trust_remote_code``;
- ``greedy``: ``{"prompts": [[ids]], "new_tokens": N, "stop_at_eos": false}``: greedy
  continuations of token ids (eos ignored unless ``stop_at_eos``);
- ``prompt_logprobs``: ``{"sequences": [[ids]]}``: the log-prob of every token given the
  ones before it (the first is null);
- ``speed``: ``{"batches": [1, 16], "prefill_tokens": 512, "decode_tokens": 64}``.

The result has ``vllm_version``, ``architecture`` (the model class vLLM resolved), the KV cache
capacity in tokens, and one entry per task; or ``error`` when vLLM refused or failed to load
the model, with every message in the exception's chain (vLLM wraps model errors). See
docs/serving.md.
"""

from __future__ import annotations

import os
import time

from protocol import serve  # protocol.py beside this script: its folder is on sys.path


def capacity(llm) -> dict:  # noqa: ANN001 - vllm.LLM
    """KV cache capacity as vLLM logs it ("KV cache size: N tokens"), with its blocks."""
    cfg = llm.llm_engine.vllm_config.cache_config
    tokens = getattr(cfg, "kv_cache_size_tokens", None)
    blocks, size = cfg.num_gpu_blocks, cfg.block_size
    if tokens is None and blocks:
        tokens = blocks * size
    return {"kv_tokens": tokens, "kv_blocks": blocks, "block_size": size}


def greedy(llm, task: dict) -> list[list[int]]:  # noqa: ANN001
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=task["new_tokens"],
        ignore_eos=not task.get("stop_at_eos", False),
        detokenize=False,
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in task["prompts"]], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def prompt_logprobs(llm, task: dict) -> list[list[float | None]]:  # noqa: ANN001
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate(
        [{"prompt_token_ids": s} for s in task["sequences"]], params, use_tqdm=False
    )
    rows = []
    for seq, o in zip(task["sequences"], outs, strict=True):
        row: list[float | None] = []
        for tok, entry in zip(seq, o.prompt_logprobs, strict=True):
            row.append(None if entry is None else float(entry[tok].logprob))
        rows.append(row)
    return rows


def speed(llm, task: dict, vocab: int) -> list[dict]:  # noqa: ANN001
    """Prefill tok/s (prompts of ``prefill_tokens``, one new token) and decode tok/s (short
    prompts, ``decode_tokens`` new ones, less the prefill's time), per batch size."""
    import random

    from vllm import SamplingParams

    rng = random.Random(0)
    rows = []
    for batch in task["batches"]:
        long = [[rng.randrange(vocab) for _ in range(task["prefill_tokens"])] for _ in range(batch)]
        short = [[rng.randrange(vocab) for _ in range(16)] for _ in range(batch)]
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        many = SamplingParams(
            temperature=0.0, max_tokens=task["decode_tokens"], ignore_eos=True, detokenize=False
        )
        llm.generate([{"prompt_token_ids": p} for p in short], one, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in long], one, use_tqdm=False)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in short], one, use_tqdm=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in short], many, use_tqdm=False)
        decode = max(time.perf_counter() - t0 - first, 1e-9)
        rows.append(
            {
                "batch": batch,
                "prefill_tok_s": batch * task["prefill_tokens"] / prefill,
                "decode_tok_s": batch * (task["decode_tokens"] - 1) / decode,
            }
        )
    return rows


def run(req: dict, res: dict) -> None:
    """Fill ``res`` as far as it gets (the caller adds the error of a failure)."""
    space = int(req.get("kv_space_gib", 2))  # whole GiB: VLLM_CPU_KVCACHE_SPACE is an integer
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(space)
    # the engine in this process: a model's refusal reaches us as the exception it raised
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm.platforms import current_platform

    # on a GPU the same space, in bytes, instead of a share of free memory
    sized = {} if current_platform.is_cpu() else {"kv_cache_memory_bytes": space * 2**30}

    res["vllm_version"] = vllm.__version__
    llm = vllm.LLM(  # a refusal or failure raises here; main() reports it
        model=req["folder"],
        dtype=req.get("dtype", "auto"),
        max_model_len=req.get("max_model_len", 1024),
        trust_remote_code=req.get("trust_remote_code", False),
        enforce_eager=True,
        seed=0,
        skip_tokenizer_init=True,  # prompts are token ids: the tokenizer is not involved
        **sized,
    )
    mc = llm.llm_engine.model_config
    res["architecture"] = getattr(mc, "architecture", None) or mc.architectures[0]
    res["served_dtype"] = str(mc.dtype).removeprefix("torch.")
    res.update(capacity(llm))
    if "greedy" in req:
        res["greedy"] = greedy(llm, req["greedy"])
    if "prompt_logprobs" in req:
        res["prompt_logprobs"] = prompt_logprobs(llm, req["prompt_logprobs"])
    if "speed" in req:
        res["speed"] = speed(llm, req["speed"], mc.get_vocab_size())


if __name__ == "__main__":  # vLLM's workers may start by spawn: this module must not rerun
    serve(run)
