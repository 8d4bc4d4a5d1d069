"""Long-context cost of PoD outputs against their original (run by hand; docs/benchmarks.md).

    python benchmarks/pod_long_context.py ORIGINAL POD [POD ...] [--contexts 2048,4096,8192]
        [--batches 1,4] [--new-tokens 16] [--repeats 1] [--threads 2] [--dtype float32]
        [--json OUT.json]

Every (model, context, batch) runs in a process of its own, one after the other, so that each
model is alone on the machine and its memory is its own: load (SDPA), one warm-up forward,
then one prefill of ``batch x context`` random token ids with ``logits_to_keep=1`` (logits do
not dominate the memory) and ``--new-tokens`` greedy decoding steps on the returned cache.
Reported per run:

- prefill seconds and tokens/s (batch x context / seconds);
- prefill peak RSS growth: the process's peak resident memory during the prefill (its
  high-water mark reset just before, through /proc/self/clear_refs) minus its resident memory
  right before;
- cache bytes: every tensor reachable from the returned cache object
  (``kvconvert.compat.cache_bytes``), and for kvconvert outputs the bytes their
  ``kvconvert.json`` promises (``kvconvert.promise``; for PoD the formula of docs/pod.md)
  and the ratio;
- decode milliseconds per step and tokens/s (batch / seconds per step).

With ``--repeats N`` each run is made N times (models alternating) and the median of each
figure is reported. A table in Markdown goes to stdout, all figures to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(folder: str, context: int, batch: int, new_tokens: int, threads: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kvconvert.compat import cache_bytes, cache_kwargs, output_cache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, attn_implementation="sdpa", dtype=getattr(torch, dtype)
    ).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, context), generator=g)
    with torch.inference_mode():
        model(input_ids=ids[:, :32], use_cache=True, logits_to_keep=1)  # warm-up
        before = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        peak = rss_kib("VmHWM")
        cache = output_cache(out)
        held = cache_bytes(cache)
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **cache_kwargs(cache))
            cache = output_cache(out)
            nxt = out.logits[:, -1:].argmax(-1)
        decode = (time.perf_counter() - t0) / new_tokens
    res = {
        "model": folder,
        "context": context,
        "batch": batch,
        "prefill_s": prefill,
        "prefill_tok_s": batch * context / prefill,
        "prefill_peak_growth_mib": (peak - before) / 1024,
        "cache_bytes": held,
        "decode_ms": decode * 1000,
        "decode_tok_s": batch / decode,
    }
    report = Path(folder) / "kvconvert.json"
    if report.is_file():  # what the conversion report promises, for each of the batch's rows
        from kvconvert.promise import expected_bytes

        promise, _ = expected_bytes(
            json.loads(report.read_text()), model.config, context, model.dtype
        )
        if promise is not None:
            res["formula_bytes"] = batch * promise
            res["vs_formula"] = held / res["formula_bytes"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="the original first, then PoD outputs")
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        folder, context, batch = a.models[0], int(a.contexts), int(a.batches)
        print(json.dumps(child(folder, context, batch, a.new_tokens, a.threads, a.dtype)))
        return
    rows = []
    for context in [int(x) for x in a.contexts.split(",")]:
        for batch in [int(x) for x in a.batches.split(",")]:
            runs: dict[str, list[dict]] = {folder: [] for folder in a.models}
            for _ in range(a.repeats):
                for folder in a.models:
                    runs[folder].append(run_child(a, folder, context, batch))
                    print(json.dumps(runs[folder][-1]), file=sys.stderr, flush=True)
            rows += [median_run(r) for r in runs.values()]
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    print(table(rows, a.models[0]))


def run_child(a: argparse.Namespace, folder: str, context: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, folder, "--child", "--contexts", str(context)]
    cmd += ["--batches", str(batch), "--new-tokens", str(a.new_tokens)]
    cmd += ["--threads", str(a.threads), "--dtype", a.dtype]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{folder} at {context} x {batch}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """Each numeric figure's median over repeated runs (and how many there were)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def table(rows: list[dict], original: str) -> str:
    base = {(r["context"], r["batch"]): r for r in rows if r["model"] == original}
    out = [
        "| model | context | batch | prefill tok/s (x orig) | prefill peak RSS growth MiB "
        "(x orig) | cache MiB (x formula) | decode tok/s (x orig) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = base[(r["context"], r["batch"])]
        vs = f" ({r['vs_formula']:.3f})" if "vs_formula" in r else ""
        out.append(
            f"| {Path(r['model']).name} | {r['context']} | {r['batch']} | "
            f"{r['prefill_tok_s']:.0f} ({r['prefill_tok_s'] / o['prefill_tok_s']:.2f}) | "
            f"{r['prefill_peak_growth_mib']:.0f} "
            f"({r['prefill_peak_growth_mib'] / o['prefill_peak_growth_mib']:.2f}) | "
            f"{r['cache_bytes'] / 2**20:.1f}{vs} | "
            f"{r['decode_tok_s']:.2f} ({r['decode_tok_s'] / o['decode_tok_s']:.2f}) |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
