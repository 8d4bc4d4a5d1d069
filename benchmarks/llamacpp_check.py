"""A second engine, actually run: llama.cpp converts and loads kvconvert outputs (by hand).

    python benchmarks/llamacpp_check.py --llama-cpp DIR --data EVAL.jsonl \\
        ORIGINAL OUTPUT [OUTPUT ...] [--num-samples 8 --seq-len 512 --json out.json]

For each folder (the original first): llama.cpp's own ``convert_hf_to_gguf.py`` writes an f32
GGUF; the script reads its metadata (architecture, per-layer ``head_count_kv``,
``feed_forward_length``) and checks the head counts against the output's ``kvconvert.json``;
then llama.cpp (through the ``llama_cpp`` Python bindings) and transformers each compute
perplexity on the same evaluation windows (``kvconvert eval --data``'s: rows shuffled with
seed 1234, joined, cut into ``--seq-len`` windows) and the script reports both and their ratio.
The issue's bar is a ratio within 1%.

``DIR`` is a llama.cpp source tree, e.g. the ``vendor/llama.cpp`` of the ``llama-cpp-python``
sdist, whose bindings must be installed (``pip install llama-cpp-python`` builds that tree;
docs/serving.md has the exact commands). Neither comes with kvconvert: the script exits with
one line when either is missing.

One shim, said out loud: llama.cpp's DeciLM converter (``conversion/deci.py``) only reads
Llama-3 (128,256 tokens) and SentencePiece-Llama vocabularies; for any other tokenizer (such as
SmolLM2's GPT-2-style BPE) its ``set_vocab`` raises FileNotFoundError. The script then calls the
converter's own GPT-2 vocabulary routine (``_set_vocab_gpt2``), the fallback llama.cpp's
Llama converter uses for the same tokenizer. Tensors and every other metadata key are the
converter's, unpatched.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

# Runs llama.cpp's converter with the DeciLM vocabulary fallback described above.
CONVERTER = """
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree + "/gguf-py", tree]
import conversion.deci as deci
plain = deci.DeciModel.set_vocab
def set_vocab(self):
    try:
        plain(self)
    except FileNotFoundError:  # neither Llama-3 nor SentencePiece: the GPT-2 BPE reader
        self._set_vocab_gpt2()
deci.DeciModel.set_vocab = set_vocab
sys.argv = [tree + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def fail(msg: str) -> None:
    raise SystemExit(f"llamacpp_check: {msg}")


def to_gguf(tree: Path, folder: Path, out: Path) -> float:
    """Convert ``folder`` to an f32 GGUF with llama.cpp's converter; seconds taken."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", CONVERTER, str(tree), str(folder)]
    res = subprocess.run(
        [*cmd, "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True
    )
    if res.returncode != 0:
        fail(f"convert_hf_to_gguf.py failed on {folder}:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def gguf_facts(tree: Path, path: Path) -> dict:
    """Architecture and per-layer head counts / MLP widths as llama.cpp will read them."""
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def value(key: str):
        field = reader.fields.get(f"{arch}.{key}")
        if field is None:
            return None
        vals = [field.parts[i].tolist() for i in field.data]
        vals = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in vals]
        return vals if len(vals) > 1 else vals[0]

    return {
        "architecture": arch,
        "head_count": value("attention.head_count"),
        "head_count_kv": value("attention.head_count_kv"),
        "feed_forward_length": value("feed_forward_length"),
        "block_count": value("block_count"),
        "tensors": len(reader.tensors),
    }


# Loads a GGUF with llama.cpp's own logging on, prefills a prompt and decodes greedily; the
# parent reads the KV cache size and the speeds from llama.cpp's log lines.
ENGINE_RUN = """
import json, sys
from llama_cpp import Llama
path, ctx, flash, threads, new = sys.argv[1:]
prompt = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=int(ctx), flash_attn=flash == "on", n_threads=int(threads),
            verbose=True)
llm.create_completion(prompt, max_tokens=int(new), temperature=0.0)
llm.close()
"""
CACHE_LINE = re.compile(
    r"llama_kv_cache: size = +([\d.]+) MiB .*K \(\w+\): +([\d.]+) MiB, V \(\w+\): +([\d.]+) MiB"
)
SPEED_LINE = re.compile(
    r"llama_perf_context_print: +(prompt eval|eval) time .*?([\d.]+) tokens per second"
)


def engine_run(path: Path, prompt: list[int], ctx: int, flash: str, threads: int, new: int) -> dict:
    """llama.cpp's KV cache at ``ctx`` cells (MiB: total, K, V) and its prefill / decode speed
    (tokens/s) on ``prompt`` then ``new`` greedy tokens, with flash attention ``flash``."""
    args = [sys.executable, "-c", ENGINE_RUN, str(path), str(ctx), flash, str(threads), str(new)]
    res = subprocess.run(args, input=json.dumps(prompt), capture_output=True, text=True)
    log = res.stdout + res.stderr
    cache, speeds = CACHE_LINE.search(log), dict(SPEED_LINE.findall(log))
    if res.returncode != 0 or cache is None or len(speeds) != 2:
        fail(f"llama.cpp run of {path} (flash attention {flash}) failed:\n{log[-2000:]}")
    total, k, v = map(float, cache.groups())
    return {
        "flash_attn": flash,
        "kv_cache_mib": {"total": total, "k": k, "v": v, "cells": ctx},
        "prefill_tok_s": float(speeds["prompt eval"]),
        "decode_tok_s": float(speeds["eval"]),
    }


def llama_cpp_nll(path: Path, windows: torch.Tensor, threads: int) -> float:
    """Mean next-token NLL (nats) of llama.cpp on each window, evaluated from an empty cache."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=windows.shape[1],
        n_batch=windows.shape[1],
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )
    total, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    llm.close()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="the original, then kvconvert outputs")
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree")
    ap.add_argument("--data", required=True, help="evaluation text (.jsonl or .txt)")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=8192, help="KV cache cells for the size")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens for the speeds")
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens for the speed")
    ap.add_argument("--work", type=Path, default=Path("llamacpp-work"), help="GGUF files here")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    tree = args.llama_cpp.expanduser()
    if not (tree / "convert_hf_to_gguf.py").is_file():
        fail(f"{tree} is not a llama.cpp source tree (no convert_hf_to_gguf.py)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        fail(f"the llama_cpp bindings do not import ({e}); pip install llama-cpp-python")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvconvert.calibration.data import load_documents, tokenize_documents
    from kvconvert.evaluate import nll_per_token

    torch.set_num_threads(args.threads)
    folders = [Path(f).expanduser() for f in args.folders]
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    windows = tokenize_documents(
        load_documents(args.data), tokenizer, args.num_samples, args.seq_len, seed=1234
    )
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        gguf = args.work / f"{folder.name}.f32.gguf"
        seconds = to_gguf(tree, folder, gguf)
        facts = gguf_facts(tree, gguf)
        report = folder / "kvconvert.json"
        if report.is_file():
            want = json.loads(report.read_text())["target"]["num_key_value_heads"]
            got = facts["head_count_kv"]
            if (want if isinstance(want, int) else list(want)) != got:
                fail(f"{folder}: GGUF head_count_kv {got} != kvconvert.json's {want}")
        t0 = time.perf_counter()
        cpp = llama_cpp_nll(gguf, windows, args.threads)
        t_cpp = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code="auto_map" in config, dtype=torch.float32
        ).eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf = nll_per_token(model, windows, batch_size=4)
        t_hf = time.perf_counter() - t0
        del model
        prompt = windows.flatten()[: args.prompt].tolist()
        engine = [
            engine_run(gguf, prompt, args.context, flash, args.threads, args.new_tokens)
            for flash in ("off", "on")
        ]
        row = {
            "folder": str(folder),
            "architectures": config.get("architectures"),
            "gguf": facts,
            "convert_s": round(seconds, 1),
            "ppl_transformers": math.exp(hf),
            "ppl_llama_cpp": math.exp(cpp),
            "ratio": math.exp(cpp - hf),
            "eval_s": {"transformers": round(t_hf, 1), "llama_cpp": round(t_cpp, 1)},
            "llama_cpp_runs": engine,
        }
        rows.append(row)
        print(
            f"{folder.name}: {facts['architecture']} head_count_kv {facts['head_count_kv']}; "
            f"ppl transformers {row['ppl_transformers']:.4f} llama.cpp "
            f"{row['ppl_llama_cpp']:.4f} (ratio {row['ratio']:.5f})",
            flush=True,
        )
        for run in engine:
            c = run["kv_cache_mib"]
            print(
                f"  flash attention {run['flash_attn']}: KV cache {c['total']} MiB at {c['cells']} "
                f"cells (K {c['k']}, V {c['v']}); prefill {run['prefill_tok_s']} tok/s, decode "
                f"{run['decode_tok_s']} tok/s",
                flush=True,
            )
    doc = {
        "data": args.data,
        "windows": list(windows.shape),
        "llama_cpp_version": getattr(llama_cpp, "__version__", None),
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
