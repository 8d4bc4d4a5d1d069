"""PoD with a bias on borrowed distant logits, chosen per (layer, KV head) by the cost (by hand).

    python benchmarks/pod_distant_bias.py MODEL WORKDIR SAVING SINK RECENT BIASES
    # e.g. smol/model /tmp/gate 0.3 16 48 0,-1,-2,-4,-8

An experiment, not a kvconvert feature (docs/pod.md, "Why borrowing hurts this model"): the
borrowing-cost pass of ``kvconvert.pod.cost`` is run with each bias of BIASES added to the
distant tokens' logits; each (layer, head, bottom) keeps its cheapest bias, the usual dynamic
programme picks the map at SAVING, and the map's KL on the held-out text is measured with the
biases applied through eager attention (the shipped model code has no bias). Paths to the
SmolLM2 fixture's texts are fixed below (``benchmarks/smollm2_fixture.py --out /tmp/smol``).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvconvert.arch import get_adapter
from kvconvert.calibration.data import load_documents, tokenize_documents
from kvconvert.evaluate import fidelity
from kvconvert.pod import cost as C
from kvconvert.pod.layermap import blocks_by_cost, predicted_saving
from kvconvert.pod.similarity import run_probe

torch.set_num_threads(2)
M, OUT = sys.argv[1], sys.argv[2]
target = float(sys.argv[3])
sink, recent, ctx = int(sys.argv[4]), int(sys.argv[5]), 512
GRID = [float(x) for x in sys.argv[6].split(",")]
tok = AutoTokenizer.from_pretrained(M)
model = AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32).eval()
cfg = json.loads(Path(M, "config.json").read_text())
cal = tokenize_documents(
    load_documents("/tmp/smol/calibration-fortunes.txt"), tok, 32, 512, 0, 49152
)
ev = tokenize_documents(load_documents("/tmp/smol/eval-austen.jsonl"), tok, 16, 512, 1234, 49152)


class Gate(C.BorrowCost):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gcost = torch.zeros(
            self.num_layers, self.kv, self.depth, len(GRID), dtype=torch.float64
        )

    def _record(self, layer, depth, bottom_scores, own, distant, error):
        for gi, beta in enumerate(GRID):
            s = torch.where(distant, bottom_scores + beta, own)
            self.gcost[layer, :, depth, gi] += error(s).to(self.gcost.device)


t0 = time.time()
probe = Gate(model, get_adapter("llama"), cfg, sink, recent, C.DEPTH, None)
run_probe(probe, cal, 4, "gate", True)
g = (probe.gcost / probe.count).numpy()
np.save(OUT + "/gcost.npy", g)
print("probe", round(time.time() - t0), "s", flush=True)
best = g.min(-1)
arg = g.argmin(-1)
m = blocks_by_cost(best, target, sink, recent, ctx)
L, KV = len(m), len(m[0])
bias = [[0.0] * KV for _ in range(L)]
for l in range(L):
    for h in range(KV):
        if m[l][h] != l:
            bias[l][h] = GRID[arg[l, h, l - m[l][h] - 1]]
chosen = [bias[l][h] for l in range(L) for h in range(KV) if m[l][h] != l]
print(
    "saving",
    predicted_saving(m, sink, recent, ctx),
    "borrowers",
    len(chosen),
    "bias counts",
    {x: chosen.count(x) for x in GRID},
)
print(
    "summed cost gated",
    sum(best[l, h, l - m[l][h] - 1] for l in range(L) for h in range(KV) if m[l][h] != l),
)
Path(OUT, "map.json").write_text(json.dumps(m))
Path(OUT, "bias.json").write_text(json.dumps(bias))
subprocess.run(
    [
        "kvconvert",
        M,
        "--target",
        "pod",
        "--pod-map",
        OUT + "/map.json",
        "--sink",
        str(sink),
        "--recent",
        str(recent),
        "-o",
        OUT + "/pod",
        "--quiet",
    ],
    check=True,
)
pod = AutoModelForCausalLM.from_pretrained(
    OUT + "/pod", dtype=torch.float32, trust_remote_code=True, attn_implementation="eager"
).eval()
mod = sys.modules[type(pod).__module__]
Mix = mod.PodAttentionMixin
B = torch.tensor(bias)  # L, KV


def forward(self, *args, **kwargs):
    cache = kwargs.get("cache", kwargs.get(self.pod_cache_kwarg))
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    mask = cache.masks(self.layer_idx, hidden.shape[1])
    add = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(
        ~mask, torch.finfo(hidden.dtype).min
    )
    layer = cache.layers[self.layer_idx]
    if getattr(layer, "shares", False):
        T = cache.get_seq_length()
        heads = self.config.num_attention_heads
        per_q = B[self.layer_idx].repeat_interleave(heads // B.shape[1])  # (heads,)
        add = add.expand(-1, heads, -1, -1).clone()
        dist = add[..., :T]
        add[..., :T] = torch.where(dist == 0, per_q[None, :, None, None].to(dist.dtype), dist)
    kwargs["attention_mask"] = add
    return super(Mix, self).forward(*args, **kwargs)


Mix.forward = forward
r = fidelity(model, pod, ev, 4)
print("gated", r, "ppl", float(np.exp(r["nll"])), round(time.time() - t0), "s", flush=True)
