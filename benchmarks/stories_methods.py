"""KL to the original of every GQA method on stories260K (run by hand, not in CI).

    python benchmarks/stories_methods.py [--model ../shared/models/stories260K] [--kv-heads 2 1]

Evaluation text is sampled from the original model with a seed disjoint from calibration.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from yardstick import Yardstick

import kvconvert

VARIANTS = [
    ("mean", {"method": "mean"}),
    ("svd-weights", {"method": "svd-weights"}),
    ("svd, real keys (ignores RoPE)", {"method": "svd", "rope_keys": "real"}),
    ("svd, complex keys, plain objective", {"method": "svd", "objective": "plain"}),
    ("svd (default: complex keys, output objective)", {"method": "svd"}),
    ("svd + --grouping search", {"method": "svd", "grouping": "search"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    ys = Yardstick(args.model, seq_len=args.seq_len)
    print("| KV heads | method | KL nats/token | convert s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for g in args.kv_heads:
            for label, opts in VARIANTS:
                out = Path(tmp) / f"{g}-{label.replace(' ', '_')}"
                t0 = time.perf_counter()
                kvconvert.convert(
                    args.model,
                    str(out),
                    kv_heads=g,
                    num_samples=args.num_samples,
                    seq_len=args.seq_len,
                    progress=False,
                    **opts,
                )
                dt = time.perf_counter() - t0
                print(f"| {g} | {label} | {ys.kl(out):.3f} | {dt:.1f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
