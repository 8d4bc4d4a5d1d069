"""What each long step of a conversion costs on this machine, per billion parameters
(run by hand; the figures in docs/scale.md come from it).

    python benchmarks/step_costs.py MODEL [--device cpu] [--threads N] [--batch 8]

Measured, each after one warm-up, in the model's float32 (CPU) or its own dtype (GPU):

- forward: one calibration batch (``--batch`` x 256 tokens, no cache), as calibration
  statistics, PoD similarity and each ``--kv-budget`` sensitivity merge run it;
- decode: one sampling step of ``--batch`` sequences with the KV cache (``--calibration
  self`` and heal's self-sampled text take ``seq_len - 1`` of these per batch);
- heal step: a forward of the original (no grad) plus forward and backward of a trainable
  copy on ``--batch`` x 128 tokens (heal's default step, full fine-tuning).

Each is printed in seconds, then scaled to one billion parameters (time x 1e9 / params; the
cost is close to proportional to the parameter count at these sizes, which the table in
docs/scale.md shows for two models).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from kvconvert.compat import cache_kwargs, output_cache
from kvconvert.loading import resolve_device, set_threads


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    set_threads(a.threads)
    device = resolve_device(a.device)
    dtype = torch.float32 if device.type == "cpu" else None
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, vocab, (a.batch, 256), generator=g).to(device)
    heal_ids = calib[:, :128]

    @torch.inference_mode()
    def forward() -> None:
        model(input_ids=calib, use_cache=False)

    with torch.inference_mode():
        res = model(input_ids=calib[:, :64], use_cache=True)
        cache = output_cache(res)
    step_ids = calib[:, 64:65]

    @torch.inference_mode()
    def decode() -> None:
        # one step on a 64-token cache, cropped back so every repeat sees the same length
        model(input_ids=step_ids, use_cache=True, **cache_kwargs(cache))
        cache.crop(-1)

    student = copy.deepcopy(model).train()
    for p in student.parameters():
        p.requires_grad_(True)

    def heal_step() -> None:
        with torch.no_grad():
            ref = F.log_softmax(model(input_ids=heal_ids, use_cache=False).logits.float(), -1)
        out = F.log_softmax(student(input_ids=heal_ids, use_cache=False).logits.float(), -1)
        loss = (ref.exp() * (ref - out)).sum(-1).mean()
        loss.backward()
        student.zero_grad(set_to_none=True)

    rows = [
        (f"forward, {a.batch} x 256 tokens", timed(forward, device)),
        (f"decode step, batch {a.batch}", timed(decode, device)),
        (f"heal step, {a.batch} x 128 tokens", timed(heal_step, device)),
    ]
    scale = 1e9 / params
    print(
        f"{a.model}: {params / 1e6:.1f}M parameters on {device}, {torch.get_num_threads()} threads"
    )
    print("| step | seconds | seconds per 1B parameters |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.4f} | {s * scale:.3f} |")


if __name__ == "__main__":
    main()
