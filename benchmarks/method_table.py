"""The method table: every method at 50% and 25% KV budgets, converted and evaluated.

    python benchmarks/method_table.py                      # writes docs/benchmarks.md
    python benchmarks/method_table.py --models synthetic --out /tmp/table.md

For stories260K (a real pretrained tiny Llama, 4 KV heads; --stories or
$KVCONVERT_STORIES260K) and a tiny synthetic Llama (the seeded `kvconvert demo` model, random
weights, 8 KV heads), each method converts the model at half and a quarter of its KV heads.
Each conversion runs in its own subprocess (``python -m kvconvert``) so that its wall time
and peak RSS (``os.wait4`` rusage of that child alone) are its own; then one
``kvconvert eval ORIGINAL ALL_CONVERTED --json`` per model measures KV bytes, KL, perplexity,
speed and retrieval. The markdown written records the machine and the command.

The 1.5B synthetic conversion-cost benchmark is a separate script,
``benchmarks/conversion_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (label, extra ``kvconvert`` flags). Every method of ``--target gqa``; a new target or method
#: gets a row here (the script refuses to run when kvconvert has a target this table lacks).
POD = ["--sink", "4", "--recent", "32", "--kv-saving", "0.15"]
METHODS: list[tuple[str, list[str]]] = [
    ("gqa mean (baseline)", ["--target", "gqa", "--kv-heads", "{G}", "--method", "mean"]),
    (
        "gqa svd-weights (data-free)",
        ["--target", "gqa", "--kv-heads", "{G}", "--method", "svd-weights"],
    ),
    ("gqa svd (default)", ["--target", "gqa", "--kv-heads", "{G}", "--method", "svd"]),
    (
        "gqa svd + grouping search",
        ["--target", "gqa", "--kv-heads", "{G}", "--method", "svd", "--grouping", "search"],
    ),
    ("gqa svd, per-layer --kv-budget (remote code)", ["--target", "gqa", "--kv-budget", "{F}"]),
    (
        "gqa --rope-keys project (paper, remote code)",
        ["--target", "gqa", "--kv-heads", "{G}", "--rope-keys", "project"],
    ),
    (
        "gqa,pod: svd + PoD sink 4 recent 32 saving 0.15",
        ["--target", "gqa,pod", "--kv-heads", "{G}", *POD],
    ),
]
#: PoD alone cannot reach 50% (values are never shared): its own row, at a 15% saving target.
POD_ROWS: list[tuple[str, list[str]]] = [
    ("pod sink 4 recent 32, --kv-saving 0.15", ["--target", "pod", *POD]),
]
COVERED_TARGETS = {"gqa", "pod", "gqa,pod"}
BUDGETS = (("50%", 2), ("25%", 4))  # label, divisor of the KV heads


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical cores{mem}, {gpu}; {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def measured_run(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MiB) of that child process alone."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{out.decode()[-2000:]}")
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return wall, rss


def kv_heads_of(folder: Path) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def bench_model(name: str, src: Path, work: Path, calib: list[str], eval_flags: list[str]) -> dict:
    py = [sys.executable, "-m", "kvconvert"]
    kv = kv_heads_of(src)
    rows = []
    base_wall, base_rss = measured_run(
        [sys.executable, "-c", "import kvconvert.pipeline, transformers, torch"]
    )
    plan = [(b, div, label, flags) for b, div in BUDGETS for label, flags in METHODS]
    plan += [("~15%", 1, label, flags) for label, flags in POD_ROWS]
    for budget, div, label, flags in plan:
        if kv % div:
            print(f"{name}: {kv} KV heads, no {budget} budget", file=sys.stderr)
            continue
        out = work / f"{name}-{kv // div}-{len(rows)}"
        fill = {"{G}": str(kv // div), "{F}": str(1 / div)}
        cmd = [*py, str(src), "-o", str(out), "-q", *(fill.get(f, f) for f in flags), *calib]
        wall, rss = measured_run(cmd)
        rows.append(
            {
                "budget": budget,
                "method": label,
                "folder": str(out),
                "wall": wall,
                "rss": rss,
                "kv_heads": kv // div,
            }
        )
        print(f"{name} {budget} {label}: {wall:.1f} s, {rss:.0f} MiB", file=sys.stderr)
    js = work / f"{name}-eval.json"
    eval_cmd = [*py, "eval", str(src), *(r["folder"] for r in rows), "--json", str(js), "-q"]
    measured_run(eval_cmd + eval_flags)
    doc = json.loads(js.read_text())
    return {
        "name": name,
        "src": src,
        "kv": kv,
        "rows": rows,
        "eval": doc,
        "baseline": (base_wall, base_rss),
    }


def render(results: list[dict], command: str) -> str:
    lines = [
        "# Benchmarks: methods at 50% and 25% KV budgets",
        "",
        "Generated by `benchmarks/method_table.py`; do not edit by hand. Regenerate with:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine()}.",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "Columns: *KV B/tok* is the cache size per token measured from the real cache after a "
        "prefill; *KL* is KL(original || converted) in nats per token and *ppl* the perplexity, "
        "both on sequences sampled from the original (seed 1234, disjoint from the calibration "
        "seed 0); *decode tok/s* is greedy decoding after a prefill of the context (median of "
        "interleaved runs; on a shared CPU expect noise of 10-20%); *retrieval* is the copy-task "
        "token accuracy averaged over depths (these models have no tokenizer, so no passkey); "
        "*convert s* and *peak RSS* are the wall time and peak resident memory of the "
        "`kvconvert` conversion process alone (Python + torch + transformers already take the "
        "*import baseline* RSS given under each table). See docs/evaluation.md.",
        "",
        "The 1.5B-parameter conversion-cost benchmark is `benchmarks/conversion_cost.py` "
        "(separate script).",
        "",
    ]
    for res in results:
        doc = res["eval"]
        s = doc["settings"]
        models = doc["models"]
        lines += [
            f"## {res['name']}",
            "",
            f"{res['kv']} KV heads; evaluation: {s['eval_tokens'][0]} x {s['eval_tokens'][1]} "
            f"tokens, context {s['context']}, {s['new_tokens']} new tokens, "
            f"{s['repeats']} timed runs, {s['trials']} retrieval prompts per depth at depths "
            f"{s['depths']}; device {doc['device']}.",
            "",
            "| budget | method | KV heads | KV B/tok | KV KiB @context | KL | ppl | decode tok/s "
            "| prefill tok/s | retrieval | convert s | peak RSS MiB |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        lines.append(_row("100%", "original", res["kv"], models[0], None))
        for row, m in zip(res["rows"], models[1:], strict=True):
            lines.append(_row(row["budget"], row["method"], row["kv_heads"], m, row))
        bw, br = res["baseline"]
        lines += [
            "",
            f"Import baseline (python -c 'import kvconvert.pipeline, transformers, "
            f"torch'): {bw:.1f} s, {br:.0f} MiB peak RSS.",
            "",
        ]
    return "\n".join(lines)


def _row(budget: str, method: str, kv: int, m: dict, conv: dict | None) -> str:
    acc = [a for a in (m["retrieval"] or {}).get("accuracy", []) if a is not None]
    cells = [
        budget,
        method,
        str(kv),
        str(m["kv_bytes_per_token"]),
        f"{m['kv_bytes_at_context'] / 1024:.0f}",
        f"{m['kl']:.4f}",
        f"{m['ppl']:.3f}",
        f"{m['decode_tok_s']:.0f}",
        f"{m['prefill_tok_s']:.0f}",
        f"{sum(acc) / len(acc):.2f}" if acc else "-",
        f"{conv['wall']:.1f}" if conv else "-",
        f"{conv['rss']:.0f}" if conv else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["stories260K", "synthetic"],
        choices=["stories260K", "synthetic"],
    )
    ap.add_argument(
        "--stories",
        default=os.environ.get(
            "KVCONVERT_STORIES260K", str(ROOT.parent / "shared/models/stories260K")
        ),
    )
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks.md"))
    ap.add_argument("--num-samples", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration tokens per sequence")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--context", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from kvconvert.recipe import TARGETS

    missing = set(TARGETS) - COVERED_TARGETS
    if missing:
        raise SystemExit(
            f"kvconvert has target(s) {sorted(missing)} this table lacks: add rows to METHODS"
        )
    calib = [
        "--num-samples",
        str(args.num_samples),
        "--seq-len",
        str(args.seq_len),
        "--device",
        args.device,
    ]
    eval_flags = [
        "--num-samples",
        str(args.eval_samples),
        "--seq-len",
        "256",
        "--context",
        str(args.context),
        "--new-tokens",
        "64",
        "--repeats",
        str(args.repeats),
        "--trials",
        str(args.trials),
        "--device",
        args.device,
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            if name == "stories260K":
                src = Path(args.stories)
                if not (src / "model.safetensors").is_file():
                    raise SystemExit(f"stories260K not found at {src} (give --stories)")
            else:
                from kvconvert.demo import write_demo_model

                src = write_demo_model(work / "synthetic-llama")
            results.append(bench_model(name, src, work, calib, eval_flags))
    command = "python benchmarks/method_table.py " + shlex.join(sys.argv[1:])
    Path(args.out).write_text(render(results, command.strip()) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
