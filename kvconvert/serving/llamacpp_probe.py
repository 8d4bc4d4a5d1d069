"""Convert one model folder with llama.cpp's converter, run it in llama.cpp, report as JSON.

    python llamacpp_probe.py REQUEST.json RESULT.json

A standalone script like ``vllm_probe.py``: it imports only the ``llama_cpp`` bindings, numpy,
the standard library and ``protocol.py``, and runs with the interpreter of the environment
that has them (``kvconvert check --engine llama.cpp --python``). The request adds
``llama_cpp_tree``, a llama.cpp source tree: its ``convert_hf_to_gguf.py`` writes the GGUF
(in the checkpoint's dtype), exactly as a user converts. llama.cpp loads it twice. First as a
user serves it, with flash attention on (without it llama.cpp pads per-layer value caches to
the widest layer) and its default f16 KV cache of ``max_model_len`` cells, whose size it logs:
the result's ``kv_bytes``, ``kv_cells`` and ``kv_type``. Then, for a float32 model, with flash
attention off and a float32 cache, so that greedy continuations and prompt log-probs come from
the model's own arithmetic. See docs/check.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from protocol import serve  # protocol.py beside this script: its folder is on sys.path

OUTTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
#: llama.cpp logs the cache size in MiB with two decimals: measure at 10 MiB or more (0.05%)
MIN_LOGGED_MIB = 10.0
CACHE_LINE = re.compile(
    r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*?K \((\w+)\): +([\d.]+) MiB, "
    r"V \((\w+)\): +([\d.]+) MiB"
)


def convert(tree: Path, folder: str, dtype: str, out: Path) -> str | None:
    """llama.cpp's converter on ``folder``; None, or its last error line."""
    script = tree / "convert_hf_to_gguf.py"
    if not script.is_file():
        return f"{tree} is not a llama.cpp source tree (no convert_hf_to_gguf.py)"
    cmd = [sys.executable, str(script), folder, "--outfile", str(out)]
    done = subprocess.run([*cmd, "--outtype", OUTTYPE.get(dtype, "f32")], capture_output=True)
    if done.returncode == 0 and out.is_file():
        return None
    lines = [s for s in done.stderr.decode(errors="replace").splitlines() if s.strip()]
    return "convert_hf_to_gguf.py failed: " + (lines[-1].strip() if lines else "no message")


def load(path: Path, n_ctx: int, flash: bool, f32_cache: bool):  # noqa: ANN201
    """A ``llama_cpp.Llama`` and llama.cpp's own (C-level) log, captured from descriptor 2."""
    import llama_cpp

    cache = llama_cpp.GGML_TYPE_F32 if f32_cache else llama_cpp.GGML_TYPE_F16
    with tempfile.TemporaryFile(mode="w+b") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                flash_attn=flash, verbose=True, n_threads=os.cpu_count() or 1,
                type_k=cache, type_v=cache,
            )  # fmt: skip
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return llm, log.read().decode(errors="replace")


def log_softmax(row):  # noqa: ANN001, ANN201 - numpy
    import numpy as np

    row = np.asarray(row, dtype=np.float64)
    row = row - row.max()
    return row - np.log(np.exp(row).sum())


def run(req: dict, res: dict) -> None:
    """Fill ``res`` as far as it gets (the caller adds the error of a failure)."""
    import llama_cpp

    res["llama_cpp_version"] = llama_cpp.__version__
    with tempfile.TemporaryDirectory(prefix="kvconvert-gguf-") as tmp:
        gguf = Path(tmp, "model.gguf")
        why = convert(Path(req["llama_cpp_tree"]), req["folder"], req.get("dtype", ""), gguf)
        if why:
            res["error"] = {"messages": [why]}
            return
        cells = int(req.get("max_model_len", 1024))
        # the cache a user gets: flash attention on (else llama.cpp pads per-layer value
        # caches to the widest layer) and llama.cpp's default f16 cache
        llm, log = load(gguf, cells, flash=True, f32_cache=False)
        res["architecture"] = llm.metadata.get("general.architecture")
        llm.close()
        cache = CACHE_LINE.search(log)
        if cache and float(cache.group(1)) < MIN_LOGGED_MIB:  # the log rounds to 0.01 MiB
            more = -(-cells * MIN_LOGGED_MIB // max(float(cache.group(1)), 0.01) // 256) * 256
            llm, log = load(gguf, int(more), flash=True, f32_cache=False)
            llm.close()
            cache = CACHE_LINE.search(log)
        if cache:
            res["kv_bytes"] = round(float(cache.group(1)) * 2**20)
            res["kv_cells"] = int(cache.group(2))
            res["kv_type"] = cache.group(3)
        # the arithmetic to compare: ggml's CPU flash attention and an f16 cache round keys and
        # values to 16 bits (about 5e-3 in the log-probs of a float32 model); without them,
        # 2e-5 on SmolLM2
        float32 = req.get("dtype") == "float32"
        llm, _ = load(gguf, cells, flash=not float32, f32_cache=float32)
    res["served_dtype"] = req.get("dtype")
    if "greedy" in req:
        rows = []
        for prompt in req["greedy"]["prompts"]:
            llm.reset()
            llm.eval(prompt)
            new = []
            for _ in range(req["greedy"]["new_tokens"]):
                scores = llm.scores[llm.n_tokens - 1]
                new.append(int(scores.argmax()))
                llm.eval([new[-1]])
            rows.append(new)
        res["greedy"] = rows
    if "prompt_logprobs" in req:
        rows = []
        for seq in req["prompt_logprobs"]["sequences"]:
            llm.reset()
            llm.eval(seq)
            row: list[float | None] = [None]
            for i in range(1, len(seq)):
                row.append(float(log_softmax(llm.scores[i - 1])[seq[i]]))
            rows.append(row)
        res["prompt_logprobs"] = rows
    llm.close()


if __name__ == "__main__":
    serve(run)
