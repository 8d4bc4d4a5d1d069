"""KL to the original on stories260K: --propagate original vs converted (run by hand).

    python benchmarks/propagate_stories.py [--model ../shared/models/stories260K] [--kv-heads 2 1]

Same protocol as stories_methods.py: calibration sampled from the model (seed 0), evaluation
text sampled from the original with a disjoint seed (1234), KL in nats per token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from yardstick import Yardstick

import kvconvert


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    ys = Yardstick(args.model, seq_len=args.seq_len)
    print("| KV heads | method | --propagate | KL nats/token | convert s |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for g in args.kv_heads:
            for method in ("svd",):
                for prop in ("original", "converted"):
                    out = Path(tmp) / f"{g}-{method}-{prop}"
                    t0 = time.perf_counter()
                    kvconvert.convert(
                        args.model,
                        str(out),
                        kv_heads=g,
                        method=method,
                        propagate=prop,
                        num_samples=args.num_samples,
                        seq_len=args.seq_len,
                        progress=False,
                    )
                    dt = time.perf_counter() - t0
                    kl = ys.kl(out)
                    print(f"| {g} | {method} | {prop} | {kl:.4f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
