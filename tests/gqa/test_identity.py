"""At identity settings (--kv-heads = current count) every exact method reproduces the model."""

from __future__ import annotations

import pytest
import torch

import kvconvert
from tests.conftest import FAMILIES, FAST, load, logits, token_ids

EXACT = [
    {"method": "mean"},
    {"method": "svd-weights"},
    {"method": "svd"},
    {"method": "svd", "objective": "plain"},
    {"method": "svd", "grouping": "search"},
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("opts", EXACT, ids=lambda o: "-".join(o.values()))
def test_identity_reproduces_logits(tiny_models, tmp_path, family, opts):
    src = tiny_models[family]
    kv = load(src).config.num_key_value_heads
    out = kvconvert.convert(str(src), str(tmp_path / "out"), kv_heads=kv, **opts, **FAST)
    ids = token_ids()
    torch.testing.assert_close(logits(out, ids), logits(src, ids), atol=1e-5, rtol=0)


def test_real_keys_are_not_exact_under_rope(tiny_models, tmp_path):
    """The baseline that ignores RoPE rotates keys by a general matrix: not exact even at t=1.

    This guards the identity test above: it shows the comparison does detect a wrong fold.
    """
    src = tiny_models["llama"]
    out = kvconvert.convert(str(src), str(tmp_path / "out"), kv_heads=4, rope_keys="real", **FAST)
    ids = token_ids()
    assert (logits(out, ids) - logits(src, ids)).abs().max() > 1e-3
