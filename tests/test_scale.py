"""The layer-sequential engine's memory bound holds with refinement on (docs/scale.md,
"Refinement's cost"): fitting a merged layer costs about one more layer, not a copy of the
layer's attention in every precision the fit passes through."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.conftest import ROOT

#: one run in its own process, so that its peak RSS (ru_maxrss) is that run's alone; torch,
#: autograd and Adam are warmed up first, so that neither run pays their one-time cost
RUN = """
import json, resource, sys
import torch
import kvconvert
p = torch.nn.Parameter(torch.ones(4)); opt = torch.optim.Adam([p]); (2 * p).sum().backward()
opt.step()
kvconvert.convert(sys.argv[1], sys.argv[2], kv_heads=4, num_samples=16, seq_len=128,
                  batch_size=8, calibration=sys.argv[1] + "/calibration.jsonl",
                  refine_steps=int(sys.argv[3]), pipeline="sequential", progress=False)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def peak_rss(model, out, refine_steps: int) -> int:
    cmd = [sys.executable, "-c", RUN, str(model), str(out), str(refine_steps)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_refinement_adds_at_most_one_and_a_half_layers(tmp_path):
    """bf16 Llama, hidden 1024, 8 heads -> 4, converted on the CPU (float32): the default
    refinement raises the peak RSS by at most 1.5 decoder layers in float32 over the same
    conversion without it (2.5-3.3 layers before the fit stopped keeping float32 copies of
    every batch, a copy of its start, the float64 merge and the original attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
    )  # fmt: skip
    model = tmp_path / "model"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model)
    ids = torch.randint(3, 1000, (16, 128), generator=torch.Generator().manual_seed(1))
    lines = [json.dumps({"input_ids": row.tolist()}) for row in ids]
    (model / "calibration.jsonl").write_text("\n".join(lines) + "\n")
    layer = 4 * (4 * 1024 * 1024 + 3 * 1024 * 3072)  # one decoder layer's bytes in float32
    without = peak_rss(model, tmp_path / "r0", 0)
    default = peak_rss(model, tmp_path / "r50", 50)
    assert default - without <= 1.5 * layer, (default - without) / layer
