"""Per-layer KV budgets and post-RoPE key projection on stories260K (run by hand, not in CI).

    python benchmarks/stories_budget.py [--model ../shared/models/stories260K]

Prints KL(original || converted) in nats/token on 16 x 256 tokens sampled from the original
(seed 1234; calibration is self-sampled with seed 0, so the two sets are disjoint), the KV
heads each layer keeps, and the KV cache bytes per token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from yardstick import Yardstick

import kvconvert

VARIANTS = [
    ("complex, uniform 4 -> 2", {"kv_heads": 2}),
    ("complex, --kv-heads-per-layer 4,2,2,1,1", {"kv_heads_per_layer": "4,2,2,1,1"}),
    ("complex, --kv-budget 0.5 (sensitivity)", {"kv_budget": 0.5}),
    ("project, uniform 4 -> 2", {"kv_heads": 2, "rope_keys": "project"}),
    ("project, --kv-budget 0.5 (sensitivity)", {"kv_budget": 0.5, "rope_keys": "project"}),
    ("complex, uniform 4 -> 1", {"kv_heads": 1}),
    ("project, uniform 4 -> 1", {"kv_heads": 1, "rope_keys": "project"}),
    ("complex, --kv-budget 0.25 (sensitivity)", {"kv_budget": 0.25}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    ys = Yardstick(args.model, seq_len=args.seq_len)
    print("| variant | KV heads per layer | KV bytes/token | KL nats/token | convert s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, opts) in enumerate(VARIANTS):
            out = Path(tmp) / str(i)
            t0 = time.perf_counter()
            kvconvert.convert(
                args.model,
                str(out),
                num_samples=args.num_samples,
                seq_len=args.seq_len,
                progress=False,
                **opts,
            )
            dt = time.perf_counter() - t0
            rep = json.loads((out / "kvconvert.json").read_text())
            heads = rep["target"]["num_key_value_heads"]
            heads = heads if isinstance(heads, list) else [heads] * rep["source"]["num_layers"]
            kl = ys.kl(out)
            kvb = rep["kv_bytes_per_token"]["after"]
            print(f"| {label} | {heads} | {kvb} | {kl:.3f} | {dt:.1f} |")
            if "budget" in rep["target"]:
                sens = rep["target"]["budget"]["sensitivity_kl"]
                print(
                    "|  sensitivities (calibration KL, layer: count=KL) | "
                    + "; ".join(
                        f"L{j}: " + ", ".join(f"{c}={v:.3f}" for c, v in s.items() if c != "4")
                        for j, s in enumerate(sens)
                    )
                    + " | | | |"
                )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
