"""What ``--calibration self`` costs, next to one forward pass over the same tokens (by hand).

    python benchmarks/sampling_cost.py MODEL [--num-samples 32 --seq-len 256 --threads 2]

Samples ``--num-samples`` sequences of ``--seq-len`` tokens from MODEL the way a conversion
does, twice: decoding ``--batch-size`` (8, the old default) sequences at a time, then as many
as ``decode_batch`` lets decode together (all of them, where their caches fit); then one
forward pass over the sampled tokens in batches of ``--batch-size`` (what calibration
statistics cost). Prints the wall times, the decode-step cost per generated token batch
against that forward pass, whether the two samplings gave the same text, and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kvconvert.calibration.data import decode_batch, sample_from_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    config = json.loads((Path(a.model) / "config.json").read_text())
    bos = int(config.get("bos_token_id") or 1)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    n, length = a.num_samples, a.seq_len
    together = decode_batch(model, bos, n, length, a.batch_size)
    runs = {}
    for batch in (a.batch_size, together):
        t0 = time.perf_counter()
        sampled = sample_from_model(model, bos, n, length, batch, a.seed)
        runs[batch] = (sampled, time.perf_counter() - t0)
    tokens = runs[together][0]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, a.batch_size):
            model(input_ids=tokens[i : i + a.batch_size], use_cache=False)
    forward = time.perf_counter() - t0
    same = sum(
        torch.equal(x, y) for x, y in zip(runs[a.batch_size][0], runs[together][0], strict=True)
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{a.model}: {n} x {length} tokens, {a.threads} threads")
    per_batch = forward / -(-n // a.batch_size)
    print(
        f"one forward pass over them: {forward:.1f} s ({per_batch:.2f} s per batch of "
        f"{a.batch_size} x {length})"
    )
    for batch, (_, seconds) in runs.items():
        steps = -(-n // batch) * (length - 1)
        print(
            f"sampling, {batch} sequences at a time: {seconds:.1f} s = {seconds / forward:.1f} "
            f"forward passes; {steps} decode steps of {seconds / steps:.3f} s, each "
            f"{seconds / steps / per_batch:.3f} of a batch forward"
        )
    print(f"identical sequences between the two samplings: {same} of {n}")
    print(f"peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
