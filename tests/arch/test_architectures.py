"""phi3 / qwen3 / gemma / gemma2 end to end: identity is exact, halved KV loads stock and halves
the measured cache."""

from __future__ import annotations

import json

import pytest
import torch

import kvconvert
from kvconvert.evaluate import kv_cache_bytes
from tests.conftest import FAST, load, logits, token_ids
from tests.models import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["svd"])
def test_identity_reproduces_logits(arch_models, tmp_path, arch, method):
    src = arch_models[arch]
    kv = load(src).config.num_key_value_heads
    out = kvconvert.convert(str(src), str(tmp_path / "o"), kv_heads=kv, method=method, **FAST)
    ids = token_ids(2, 40)  # longer than gemma2's sliding window (8)
    torch.testing.assert_close(logits(out, ids), logits(src, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_halved_kv_stock_load_generate_and_cache_bytes(arch_models, tmp_path, arch):
    src = arch_models[arch]
    orig = load(src)
    kv = orig.config.num_key_value_heads
    out = kvconvert.convert(str(src), str(tmp_path / "o"), kv_heads=kv // 2, **FAST)
    cfg, src_cfg = (json.loads((f / "config.json").read_text()) for f in (out, src))
    assert cfg.pop("num_key_value_heads") == kv // 2 and "auto_map" not in cfg
    src_cfg.pop("num_key_value_heads")
    assert cfg == src_cfg  # every other detail (head_dim, soft-caps, sliding layers) verbatim
    conv = load(out)
    assert type(conv) is type(orig)
    ids = token_ids(2, 24)
    gen = conv.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 30)
    before, after = kv_cache_bytes(orig, ids), kv_cache_bytes(conv, ids)
    assert after * 2 == before
    assert (logits(out, ids) - logits(orig, ids)).abs().max() > 1e-3  # really merged


def test_phi3_fused_qkv_written_back_with_new_kv(arch_models, tmp_path):
    """The fused tensor is written back with (H + 2*KV')*d rows, q rows first."""
    from safetensors import safe_open

    src = arch_models["phi3"]
    out = kvconvert.convert(str(src), str(tmp_path / "o"), kv_heads=1, method="mean", **FAST)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    with (
        safe_open(str(src / "model.safetensors"), "pt") as a,
        safe_open(str(out / "model.safetensors"), "pt") as b,
    ):
        old, new = a.get_tensor(name), b.get_tensor(name)
    d = 8  # 64 hidden / 8 heads
    assert new.shape == ((8 + 2) * d, 64)
    k_old = old[64 : 64 + 4 * d].view(4, d, 64)
    torch.testing.assert_close(new[64 : 64 + d], k_old.mean(0))  # mean of the 4 key heads
