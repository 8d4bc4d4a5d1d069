"""KL to the original before and after healing, on stories260K (run by hand, not in CI).

    OMP_NUM_THREADS=1 python benchmarks/heal_stories.py --inits mean svd --steps 100 300 1000

Converts stories260K from 4 to 2 KV heads with each initialisation (self-calibration), heals
each conversion for each step count (separate runs: the lr schedule depends on the total) and
prints KL(original || model) in nats/token on 16 x 256 tokens sampled from the original with
seed 1234 (the same evaluation text as benchmarks/stories_methods.py, disjoint from the
training text, which uses --seed 0). Wall time is the heal call (sampling + training + eval +
write).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from yardstick import Yardstick

import kvconvert
from kvconvert.heal import HealOptions, heal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--inits", nargs="+", default=["mean", "svd"])
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--set", nargs="*", default=[], help="heal options, e.g. lr=1e-3 lora=4")
    ap.add_argument("--keep", help="copy each healed folder here (for a second heal stage)")
    args = ap.parse_args()
    extra = {}
    # each option's type from its default, or its CLI type where the default is None (lr)
    types = {
        f.name: f.metadata.get("type") or type(f.default) for f in dataclasses.fields(HealOptions)
    }
    for kv in args.set:
        k, v = kv.split("=", 1)
        extra[k] = (v.lower() in ("1", "true")) if types[k] is bool else types[k](v)
    ys = Yardstick(args.model)
    print(f"heal options: {extra or 'defaults'}; torch threads {torch.get_num_threads()}")
    print("| init | steps | KL before | KL after | heal wall s |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for init in args.inits:
            conv = Path(tmp) / f"conv-{init}"
            kvconvert.convert(
                args.model, str(conv), kv_heads=args.kv_heads, method=init, progress=False
            )
            before = ys.kl(conv)
            for steps in args.steps:
                out = Path(tmp) / f"healed-{init}-{steps}"
                t0 = time.perf_counter()
                opts = HealOptions(
                    original=args.model, converted=str(conv), output=str(out), steps=steps, **extra
                )
                heal(opts, progress=False)
                dt = time.perf_counter() - t0
                after = ys.kl(out)
                rep = json.loads((out / "kvconvert.json").read_text())["heal"][-1]
                print(
                    f"| {init} | {steps} | {before:.3f} | {after:.3f} | {dt:.0f} |"
                    f" train loss (last steps) {rep['final_loss']}",
                    flush=True,
                )
                if args.keep:
                    shutil.copytree(out, Path(args.keep) / out.name, dirs_exist_ok=True)


if __name__ == "__main__":
    main()
