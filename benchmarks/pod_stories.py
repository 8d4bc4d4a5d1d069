"""PoD on stories260K: the layer map, measured cache saving, KL and decode speed (by hand).

    python benchmarks/pod_stories.py [--model ../shared/models/stories260K] [--kv-saving 0.15]

Converts with ``--target pod`` (self-sampled calibration), then measures on sequences sampled
from the original with a seed disjoint from calibration:
- the KV cache bytes held by the real cache objects after a prefill of ``--seq-len`` tokens,
  as a saving against the original's cache (for gqa,pod: merge and PoD together),
- KL(original || PoD) per token over those sequences (full-sequence forward),
- greedy decode speed with the cache (prompt ``--prompt`` tokens, up to ``--seq-len`` total),
  original vs PoD, best of ``--repeats``, on the CPU with the given torch threads.
Also reports the fixed maps of the issue (layers 3-4 onto layer 2; all layers onto layer 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from yardstick import Yardstick, load

import kvconvert
from kvconvert.evaluate import kv_cache_bytes


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, new: int) -> float:
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
    )
    assert out.shape[1] == prompt.shape[1] + new
    return time.perf_counter() - t0


def measure(ys: Yardstick, folder: Path, args) -> dict:
    orig, evals, pod = ys.original, ys.tokens, load(folder)
    dense_bytes = kv_cache_bytes(orig, evals[:1])
    pod_bytes = kv_cache_bytes(pod, evals[:1])
    prompt = evals[: args.batch, : args.prompt]
    new = args.seq_len - args.prompt
    times = {"orig": [], "pod": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        times["orig"].append(decode_seconds(orig, prompt, new))
        times["pod"].append(decode_seconds(pod, prompt, new))
    tok = {k: args.batch * new / statistics.median(v) for k, v in times.items()}
    return {
        "measured_saving": 1 - pod_bytes / dense_bytes,
        "cache_bytes": [dense_bytes, pod_bytes],
        "kl": ys.kl(pod),
        "tok_s_orig": tok["orig"],
        "tok_s_pod": tok["pod"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--kv-saving", type=float, default=0.15)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="only the --kv-saving maps")
    ap.add_argument("--map-by", nargs="+", default=["cost", "similarity"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ys = Yardstick(args.model, args.eval_samples, args.seq_len, batch_size=8)
    orig = ys.original
    common = dict(sink=args.sink, recent=args.recent, seq_len=args.seq_len, progress=False)
    common["context"] = args.seq_len  # the saving at the evaluated length (docs/pod.md)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            f"--kv-saving {args.kv_saving} --map-by {by}": dict(
                target="pod", kv_saving=args.kv_saving, num_samples=args.num_samples, map_by=by
            )
            for by in args.map_by
        }
        if not args.quick:
            runs[f"--target gqa,pod --kv-heads 2 --kv-saving {args.kv_saving}"] = dict(
                target="gqa,pod",
                kv_heads=2,
                kv_saving=args.kv_saving,
                num_samples=args.num_samples,
            )
        layers = orig.config.num_hidden_layers
        kv = orig.config.num_key_value_heads
        fixed = {
            "layers 3-4 onto layer 2": [[min(i, 2)] * kv for i in range(layers)],
            "all layers onto layer 0": [[0] * kv for _ in range(layers)],
        }
        for name, pod_map in fixed.items() if not args.quick else []:
            path = Path(tmp) / f"{len(runs)}.json"
            path.write_text(json.dumps(pod_map))
            runs[name] = dict(target="pod", pod_map=str(path))
        print(
            "| map | blocks per KV head | predicted PoD saving | measured saving vs original "
            "| KL nats/token "
            "| decode tok/s orig | decode tok/s PoD |\n|---|---|---|---|---|---|---|"
        )
        for i, (name, opts) in enumerate(runs.items()):
            out = kvconvert.convert(args.model, str(Path(tmp) / f"out{i}"), **common, **opts)
            rep = json.loads((out / "kvconvert.json").read_text())
            m = measure(ys, out, args)
            print(
                f"| {name} | {rep['target']['blocks']} | "
                f"{rep['target']['predicted_kv_saving']:.2%} | {m['measured_saving']:.2%} | "
                f"{m['kl']:.3f} | {m['tok_s_orig']:.0f} | {m['tok_s_pod']:.0f} |"
            )
            if rep["similarity"]["matrix"] is not None:
                print(
                    "similarity (rows: layers l,l+1; cols: KV heads):", rep["similarity"]["matrix"]
                )


if __name__ == "__main__":
    main()
