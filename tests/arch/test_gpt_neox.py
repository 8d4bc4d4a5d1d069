"""GPT-NeoX: its fused per-head qkv and partial rotary, at the solver level.

The adapter's split/fuse, calibration hooks on the fused activation, and the identity fold
through merge_layer into the stock model; the converted output (kvconvert's modeling code,
since transformers' GPT-NeoX has no GQA) is tested in test_remote_archs.py.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from kvconvert.arch import get_adapter, supported_model_types
from kvconvert.arch.base import fuse_qkv, split_qkv
from kvconvert.errors import KVConvertError
from kvconvert.inspection import format_info, inspect_model
from tests.conftest import load, token_ids
from tests.models import fold_identity_in_place


@pytest.fixture(scope="module")
def neox(remote_arch_models):
    folder = remote_arch_models["gpt_neox"]
    return load(folder), folder


@pytest.mark.parametrize("layout", ["concat", "per_head"])
def test_split_fuse_round_trip(layout):
    h, d = 4, 16
    q_rows = h * d
    t = torch.randn(3 * q_rows, 7)
    q, k, v = split_qkv(t, h, d, layout=layout)
    assert q.shape == k.shape == v.shape == (q_rows, 7)
    assert torch.equal(fuse_qkv(q, k, v, d, layout), t)
    x = torch.randn(3, 7)  # activations x @ W^T are cut along their last dim the same way
    for p, w in zip(split_qkv(x @ t.T, h, d, dim=-1, layout=layout), (q, k, v), strict=True):
        torch.testing.assert_close(p, x @ w.T)


def test_per_head_layout_matches_transformers(neox):
    model, _ = neox
    att = model.gpt_neox.layers[0].attention
    x = torch.randn(1, 3, 64)
    fused = att.query_key_value(x)
    q_ref, k_ref, v_ref = fused.view(1, 3, 4, 48).chunk(3, dim=-1)  # what GPT-NeoX does
    q, k, v = split_qkv(fused, 4, 16, dim=-1, layout="per_head")
    for a, b in ((q, q_ref), (k, k_ref), (v, v_ref)):
        torch.testing.assert_close(a, b.reshape(1, 3, 64))


@pytest.mark.parametrize("method", ["svd", "svd-weights"])
def test_identity_fold_reproduces_stock_logits(neox, method):
    model, _ = neox
    assert get_adapter("gpt_neox").rope_pairs(model.config.to_dict()) == [(0, 2), (1, 3)]
    ids = token_ids(2, 40)
    folded = deepcopy(model)
    fold_identity_in_place(folded, "gpt_neox", method)
    with torch.inference_mode():
        torch.testing.assert_close(
            folded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_per_head_fuse_refuses_fewer_kv_heads():
    with pytest.raises(KVConvertError, match="cannot hold fewer KV heads"):
        fuse_qkv(torch.zeros(64, 8), torch.zeros(32, 8), torch.zeros(32, 8), 16, "per_head")


def test_inspect_reports_layout(neox):
    info = inspect_model(str(neox[1]))
    assert info["supported"] and info["targets"] == {"gqa": "kvconvert", "pod": "kvconvert"}
    assert info["rotary_dims"] == "4 of 16" and "query_key_value" in info["attention"]
    assert "gpt_neox" in supported_model_types()
    text = format_info(info)
    assert "--target gqa -> kvconvert output (trust_remote_code=True)" in text
    assert "[q_h; k_h; v_h] per head" in text
