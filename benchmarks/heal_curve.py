"""Perplexity on held-out real text along one healing run (by hand, not in CI).

    python benchmarks/heal_curve.py ORIGINAL CONVERTED --data eval.jsonl --at 0 10 20 40 80 \
        --set steps=80 calibration=fortunes.txt seq_len=512 batch_size=4 --json curve.json

Runs ``kvconvert heal`` (options as ``--set key=value``, the names of ``HealOptions``) and, after
the steps listed in ``--at``, measures KL(original || student), perplexity and top-1 agreement
on ``--num-samples`` x ``--seq-len`` tokens of ``--data`` (the same tokens and code as
``kvconvert eval`` and ``benchmarks/pod_diagnose.py``). The points are one run's trajectory:
the learning rate at step 20 of an 80-step run is not that of a 20-step run. The healed
output is written to ``--out`` (default: a temporary folder, removed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from pod_diagnose import Judge
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvconvert.calibration.data import load_documents, tokenize_documents, vocab_size
from kvconvert.heal import HealOptions, heal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("original")
    ap.add_argument("converted")
    ap.add_argument("--data", required=True)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--at", type=int, nargs="+", default=[0, 10, 20, 40, 80])
    ap.add_argument("--set", nargs="*", default=[], help="heal options, e.g. steps=80 lr=1e-3")
    ap.add_argument("--out")
    ap.add_argument("--json")
    a = ap.parse_args()
    # each option's type: its CLI type where declared (None defaults: lr, threads), else its
    # default's
    types = {
        f.name: f.metadata.get("type") or type(f.default) for f in dataclasses.fields(HealOptions)
    }
    extra = {}
    for kv in a.set:
        key, value = kv.split("=", 1)
        kind = types.get(key, str)
        if kind is bool:
            extra[key] = value.lower() in ("1", "true", "yes")
        else:
            extra[key] = value if kind in (str, type(None)) else kind(value)
    tmp = None if a.out else tempfile.mkdtemp()
    out = Path(a.out or tmp) / "healed"
    original = AutoModelForCausalLM.from_pretrained(a.original).eval()
    tok = AutoTokenizer.from_pretrained(a.original)
    vocab = vocab_size(json.loads((Path(a.original) / "config.json").read_text()))
    tokens = tokenize_documents(
        load_documents(a.data), tok, a.num_samples, a.seq_len, a.seed, vocab
    )
    judge = Judge(original, tokens, batch_size=4)
    del original
    points = []
    t0 = time.perf_counter()
    measured = 0.0

    def measure(model, step: int) -> None:
        nonlocal measured
        t = time.perf_counter()
        model.eval()
        r = {"step": step, **judge(model), "wall_s": round(t - t0 - measured, 1)}
        model.train()
        measured += time.perf_counter() - t
        points.append(r)
        print(
            f"step {step:>4}: KL {r['kl']:.4f} ppl {r['ppl']:.2f} top-1 {r['top1']:.3f} "
            f"({r['wall_s']} s so far, measurements excluded)",
            flush=True,
        )

    def callback(run, step: int, loss: float) -> None:
        if step in a.at:
            measure(run.student, step)

    if 0 in a.at:
        conv = AutoModelForCausalLM.from_pretrained(a.converted, trust_remote_code=True)
        measure(conv, 0)
        del conv
    opts = HealOptions(original=a.original, converted=a.converted, output=str(out), **extra)
    heal(opts, progress=True, callback=callback)
    doc = {"original_ppl": math.exp(judge.nll), "heal": extra, "points": points}
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
