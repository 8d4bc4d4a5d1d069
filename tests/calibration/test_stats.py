"""Second moments accumulated batch by batch equal the moments of all activations at once."""

from __future__ import annotations

import torch

from kvconvert.arch import get_adapter
from kvconvert.calibration.stats import StatsCollector
from tests.conftest import load, token_ids


def test_batched_moments_equal_full_moments(tiny_models):
    m = load(tiny_models["qwen2"])
    cfg = m.config.to_dict()
    ids = token_ids(4, 16)
    captured = {}
    hook = m.model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda _m, _i, out: captured.setdefault("k", out.detach().reshape(-1, out.shape[-1]))
    )
    with torch.inference_mode():
        m(input_ids=ids)
    hook.remove()
    with torch.inference_mode(), StatsCollector(m, get_adapter("qwen2"), cfg) as col:
        for i in range(4):
            m(input_ids=ids[i : i + 1])
    stats = col.result()[1]
    k = captured["k"].double()
    assert stats.count == ids.numel()
    torch.testing.assert_close(stats.k, k.T @ k / k.shape[0], rtol=1e-5, atol=1e-6)
