"""Which objective the refinement fits, and for how many steps (run by hand; docs/benchmarks.md,
"The refinement's steps and objective").

    python benchmarks/refine_objective.py smol/model R0 OUT --calibration FILE \
        --local-steps 50 --drift-steps 50

R0 is a conversion made with ``--refine-steps 0`` (the closed-form merge) and the same
``--calibration``. Each merged layer, bottom to top, takes two fits in turn:

- ``--local-steps``: what ``--refine-steps`` does, the layer's attention fitted to the
  original's attention output on the original model's activations;
- ``--drift-steps``: then fitted on the *converted* model's own activations (the layers below
  already converted and fitted) to the original's post-attention residual stream, so that it
  also makes up for the drift of the layers below.

Both use ``--refine-steps``' settings: Adam, peak step 0.02 x each tensor's RMS, cosine decay,
one batch of 8 sequences at 64 random query positions per step. OUT is R0 with the fitted
weights, to evaluate with ``kvconvert eval``. A prototype for measurement, not a conversion
path: it holds the whole model, in float32.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvconvert.calibration.data import load_documents, tokenize_documents
from kvconvert.gqa.refine import _draw_rows, rows_output

PEAK, ROWS, BATCH = 0.02, 64, 8


def fit(attn, loss, steps: int, peaks: list[float], check: torch.Tensor, data: tuple) -> tuple:
    """``steps`` Adam steps on ``loss(batch, rows)``, each tensor's peak step ``peaks``; the
    mean loss at query positions ``check`` of every batch, before and after. ``data``: the
    number of batches, the sequence length and the generator that draws rows."""
    batches, seq, gen = data
    params = list(attn.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [p], "lr": a} for p, a in zip(params, peaks, strict=True)])

    def mean() -> float:
        with torch.no_grad():
            return sum(float(loss(b, check)) for b in range(batches)) / batches

    before = mean()
    for s in range(steps):
        for g, peak in zip(opt.param_groups, peaks, strict=True):
            g["lr"] = peak * 0.5 * (1 + math.cos(math.pi * s / steps))
        opt.zero_grad()
        loss(s % batches, _draw_rows(gen, seq, ROWS)).backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return before, mean()


def layer_loss(attn, inputs, target, scale, pos: dict):
    """The relative error of ``attn`` on ``inputs`` against ``target``, per batch and rows:
    local: (the original stream, the original's attention output); drift: (the converted
    stream, what brings it back to the original's residual stream after attention)."""

    def loss(b: int, rows: torch.Tensor) -> torch.Tensor:
        part = slice(b * BATCH, (b + 1) * BATCH)
        out = rows_output(attn, {"hidden_states": inputs[part], **pos}, rows)
        y = target[part][:, rows]
        return (out - y).square().sum() / scale[part][:, rows].square().sum()

    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("r0", help="a --refine-steps 0 conversion of ORIGINAL")
    ap.add_argument("out")
    ap.add_argument("--calibration", required=True, help="the text R0 was calibrated on")
    ap.add_argument("--local-steps", type=int, default=50)
    ap.add_argument("--drift-steps", type=int, default=50)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    orig = AutoModelForCausalLM.from_pretrained(a.original, dtype=torch.float32).eval()
    conv = AutoModelForCausalLM.from_pretrained(a.r0, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.original)
    docs = load_documents(a.calibration, "text")
    ids = tokenize_documents(docs, tok, a.num_samples, a.seq_len, 0, None)
    start = time.time()
    with torch.no_grad():
        xo = orig.model.embed_tokens(ids)
    xc = xo.clone()
    cos, sin = orig.model.rotary_emb(xo, torch.arange(a.seq_len)[None])
    pos = {"position_embeddings": (cos.expand(BATCH, -1, -1), sin.expand(BATCH, -1, -1))}
    batches = ids.shape[0] // BATCH
    gen = torch.Generator().manual_seed(0)
    for i, (lo, lc) in enumerate(zip(orig.model.layers, conv.model.layers, strict=True)):
        attn = lc.self_attn
        # what rows_output reads of a KVConvertAttention (a stock Llama one lacks them)
        attn.num_kv_heads = attn.config.num_key_value_heads
        attn.projected, attn.sliding_window = False, None
        with torch.no_grad():
            no, nc = lo.input_layernorm(xo), lc.input_layernorm(xc)
            ao = lo.self_attn(no, position_embeddings=(cos, sin), attention_mask=None)[0]

        check = _draw_rows(gen, a.seq_len, ROWS)  # one set per layer, for both fits
        peaks = [PEAK * float(p.square().mean().sqrt()) for p in attn.parameters()]
        streams = {"local": (no, ao), "drift": (nc, xo + ao - xc)}
        for name, steps in (("local", a.local_steps), ("drift", a.drift_steps)):
            if steps:
                loss = layer_loss(attn, *streams[name], ao, pos)
                before, after = fit(attn, loss, steps, peaks, check, (batches, a.seq_len, gen))
                print(f"layer {i} {name}: {before:.4f} -> {after:.4f}", flush=True)
        with torch.no_grad():
            xo = lo(xo, position_embeddings=(cos, sin), attention_mask=None)
            xc = lc(xc, position_embeddings=(cos, sin), attention_mask=None)
            xo = xo[0] if isinstance(xo, tuple) else xo
            xc = xc[0] if isinstance(xc, tuple) else xc
    print(f"fitted in {time.time() - start:.1f} s")
    shutil.copytree(a.r0, a.out)
    conv.save_pretrained(a.out)


if __name__ == "__main__":
    main()
