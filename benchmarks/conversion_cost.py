"""Peak RSS and wall time of a conversion vs the checkpoint size and one plain forward pass.

    python benchmarks/synthetic_llama.py /tmp/llama1.5b          # once: 1.55B bf16, 3.1 GB
    python benchmarks/conversion_cost.py /tmp/llama1.5b --kv-heads 8 [--device cuda]

Each measurement runs in its own subprocess (so peak RSS, ``ru_maxrss``, is that run's alone):
1. forward: load the model with ``from_pretrained`` in the conversion's compute dtype and run
   one forward pass over the same calibration tokens, in the same batches;
2. convert: ``kvconvert.convert`` (the layer-sequential engine) with the model's
   ``calibration.jsonl`` (pre-tokenized ``input_ids``).
Targets (issue 7): convert peak RSS < 0.35x checkpoint bytes; convert wall <= 1.5x forward.
``--refine-steps 0`` / ``--refine-rows 0`` compare the refinement's cost (docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child_forward(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kvconvert.calibration.data import batches, load_documents, tokenize_documents

    docs = load_documents(str(Path(a.model) / "calibration.jsonl"))
    tokens = tokenize_documents(docs, None, a.num_samples, a.seq_len, a.seed)
    # the conversion's compute dtype: float32 on the CPU, the checkpoint's dtype on a GPU
    dtype = torch.float32 if a.device == "cpu" else "auto"
    rss0, t0 = peak_rss(), time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=dtype, device_map=None if a.device == "cpu" else a.device
    ).eval()
    sync(a.device)
    t1 = time.perf_counter()
    with torch.inference_mode():
        for b in batches(tokens, a.batch_size):
            model(input_ids=b.to(a.device), use_cache=False, logits_to_keep=1)
    sync(a.device)
    t2 = time.perf_counter()
    return {
        "gpu_peak": gpu_peak(a.device),
        "load_s": t1 - t0,
        "forward_s": t2 - t1,
        "peak_rss": peak_rss(),
        "rss_after_import": rss0,
    }


def child_convert(a: argparse.Namespace) -> dict:
    # the same imports outside the timer as child_forward (transformers' model classes)
    from transformers import AutoModelForCausalLM  # noqa: F401

    import kvconvert
    import kvconvert.pipeline  # noqa: F401

    rss0, t0 = peak_rss(), time.perf_counter()
    kvconvert.convert(
        a.model,
        a.out,
        kv_heads=a.kv_heads,
        calibration=str(Path(a.model) / "calibration.jsonl"),
        num_samples=a.num_samples,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        seed=a.seed,
        propagate=a.propagate,
        device=a.device,
        progress=False,
        **{
            k: v
            for k, v in (("refine_steps", a.refine_steps), ("refine_rows", a.refine_rows))
            if v is not None
        },  # fmt: skip
    )
    return {
        "convert_s": time.perf_counter() - t0,
        "peak_rss": peak_rss(),
        "rss_after_import": rss0,
        "gpu_peak": gpu_peak(a.device),
    }


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_peak(device: str) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0


def run_child(kind: str, a: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, a.model, "--child", kind, *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{kind} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--propagate", default="original", choices=["original", "converted"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the conversion's --device)")
    ap.add_argument("--refine-steps", type=int, help="kvconvert's --refine-steps (default: its)")
    ap.add_argument("--refine-rows", type=int, help="kvconvert's --refine-rows (default: its)")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--child", choices=["forward", "convert"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        fn = child_forward if a.child == "forward" else child_convert
        print(json.dumps(fn(a)))
        return
    opts = ["--kv-heads", str(a.kv_heads), "--num-samples", str(a.num_samples)]
    opts += ["--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--seed", str(a.seed)]
    opts += ["--propagate", a.propagate, "--device", a.device]
    for flag, value in (("--refine-steps", a.refine_steps), ("--refine-rows", a.refine_rows)):
        opts += [flag, str(value)] if value is not None else []
    ckpt = sum(p.stat().st_size for p in Path(a.model).glob("*.safetensors"))
    with tempfile.TemporaryDirectory(dir=Path(a.model).parent) as tmp:
        conv = run_child("convert", a, [*opts, "--out", str(Path(tmp) / "out")])
    fwd = None if a.skip_forward else run_child("forward", a, opts)
    gb = 1e9
    print(f"checkpoint: {a.model}, {ckpt / gb:.3f} GB of safetensors")
    print(
        f"calibration: {a.num_samples} x {a.seq_len} tokens, batch {a.batch_size}, "
        f"device {a.device}"
    )
    print(
        f"convert (--propagate {a.propagate}, --refine-steps {a.refine_steps}, --refine-rows "
        f"{a.refine_rows}; None: the default): {conv['convert_s']:.1f} s "
        f"(process {conv['process_wall_s']:.1f} s), peak RSS {conv['peak_rss'] / gb:.3f} GB "
        f"= {conv['peak_rss'] / ckpt:.3f}x checkpoint (target < 0.35x); "
        f"RSS after imports {conv['rss_after_import'] / gb:.3f} GB; "
        f"peak GPU memory {conv['gpu_peak'] / gb:.3f} GB"
    )
    if fwd:
        print(
            f"forward baseline ({'float32' if a.device == 'cpu' else 'checkpoint dtype'}): "
            f"load {fwd['load_s']:.1f} s + forward "
            f"{fwd['forward_s']:.1f} s (process {fwd['process_wall_s']:.1f} s), peak RSS "
            f"{fwd['peak_rss'] / gb:.3f} GB, peak GPU memory {fwd['gpu_peak'] / gb:.3f} GB"
        )
        print(
            f"convert / forward = {conv['convert_s'] / fwd['forward_s']:.2f}x; "
            f"convert / (load + forward) = "
            f"{conv['convert_s'] / (fwd['load_s'] + fwd['forward_s']):.2f}x (target <= 1.5x)"
        )


if __name__ == "__main__":
    main()
