"""The default heal's self-sampled training text, sampled once as pre-tokenized .jsonl, so that
heal variants train on the same text (run by hand; docs/benchmarks.md, "What the heal trains
on, and how").

    python benchmarks/heal_text.py smol/model OUT_DIR [--threads 2]

Writes, with the sampler and seed ``kvconvert heal --calibration self`` uses
(``kvconvert.heal.data.sample_tokens``: BOS, temperature 1, seed 0; each sequence's text
depends only on its index):

- ``self128.jsonl``: 816 x 128 tokens, what the default heal samples (100 steps x 8 + 16
  held out);
- ``self512.jsonl``: 216 x 512 tokens, the same for ``--seq-len 512 --batch-size 2``.

Give either to ``kvconvert heal ... --calibration FILE``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kvconvert.heal.data import sample_tokens
from kvconvert.heal.options import HealOptions

#: (file, sequences, tokens each)
TEXTS = (("self128.jsonl", 816, 128), ("self512.jsonl", 216, 512))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    folder = Path(a.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seq_len in TEXTS:
        start = time.time()
        opts = HealOptions(seq_len=seq_len, seed=0)  # heal's sampler, as --calibration self runs it
        with torch.no_grad():
            tokens = sample_tokens(model, folder, n, opts, out / "sampled.pt", progress=True)
        with open(out / name, "w") as f:
            for row in tokens.tolist():
                f.write(json.dumps({"input_ids": row}) + "\n")
        print(f"{name}: {n} x {seq_len} tokens in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
