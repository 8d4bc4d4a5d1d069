"""A stand-in serving engine that speaks the probe protocol of ``kvconvert/serving/vllm_probe.py``.

``kvconvert check --engine vllm --python P`` runs ``P PROBE REQUEST RESULT``. ``interpreter``
writes an executable ``P`` that runs this file instead, so that the comparison paths run
without vLLM. Like vLLM it reads the config through ``AutoConfig`` and looks up a model-wide KV
head count under ``n_head_kv`` first (where kvconvert checkpoints that it cannot serve answer
with their reason), then computes with transformers. ``KVCONVERT_STANDIN`` picks a behaviour:

- ``faithful``: greedy tokens, prompt log-probs, and a KV cache sized from the config's own head
  counts (not from kvconvert.json): vLLM's capacity in tokens, or, when the request names a
  llama.cpp tree, llama.cpp's f16 bytes at ``max_model_len`` cells;
- ``dense``: ignores what ``n_head_kv`` says (an engine that would run anything);
- ``drift``: log-probs off by 0.01 (an engine computing a slightly different model);
- ``crash``: dies without a result, as a segfaulting engine would.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path


def interpreter(folder: Path, mode: str) -> str:
    """An executable that runs this stand-in in ``mode`` with the test's interpreter."""
    path = folder / f"python-{mode}"
    path.write_text(
        f'#!/bin/sh\nKVCONVERT_STANDIN={mode} exec {sys.executable} {Path(__file__)} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def serve(req: dict, mode: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = req["folder"]
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=req["trust_remote_code"])
        if mode != "dense":
            getattr(config, "n_head_kv", None)
    except Exception as e:  # noqa: BLE001 - reported like the probe does
        return {"vllm_version": "standin", "llama_cpp_version": "standin",
                "error": {"messages": [f"ValueError: {e}"]}}  # fmt: skip
    dtype = getattr(torch, req["dtype"])
    stock = getattr(config, "source_model_type", None)
    if mode == "dense" and stock:  # PoD's weights in the source's own (dense) class
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[stock])
        model = cls.from_pretrained(folder, dtype=dtype).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=req["trust_remote_code"], dtype=dtype
        ).eval()
    greedy = []
    with torch.no_grad():
        for prompt in req["greedy"]["prompts"]:  # greedy, eos ignored (not suppressed)
            seq = list(prompt)
            for _ in range(req["greedy"]["new_tokens"]):
                logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                seq.append(int(logits.argmax()))
            greedy.append(seq[len(prompt) :])
        rows = []
        for seq in req["prompt_logprobs"]["sequences"]:
            ids = torch.tensor([seq])
            lp = model(ids, use_cache=False).logits.float().log_softmax(-1)[0]
            picked = lp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
            drift = 0.01 if mode == "drift" else 0.0
            rows.append([None, *(float(x) + drift for x in picked)])
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    values = 2 * text.num_hidden_layers * heads * head_dim  # keys and values per token
    out = {"architecture": type(model).__name__, "greedy": greedy, "prompt_logprobs": rows}
    if "llama_cpp_tree" in req:  # like llama.cpp: an f16 cache of max_model_len cells
        cells = req["max_model_len"]
        return {**out, "llama_cpp_version": "standin", "kv_bytes": 2 * values * cells,
                "kv_cells": cells, "kv_type": "f16"}  # fmt: skip
    size = torch.empty((), dtype=getattr(torch, req["dtype"])).element_size()
    tokens = req["kv_space_gib"] * 2**30 // (values * size)
    return {**out, "vllm_version": "standin", "kv_tokens": tokens}


if __name__ == "__main__":
    mode = os.environ["KVCONVERT_STANDIN"]
    if mode == "crash":
        print("Fatal Python error: Segmentation fault", file=sys.stderr)
        sys.exit(139)
    request = json.loads(Path(sys.argv[2]).read_text())
    Path(sys.argv[3]).write_text(json.dumps(serve(request, mode)))
