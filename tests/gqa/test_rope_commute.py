"""The complex per-frequency merge commutes with RoPE.

A converted model (fewer KV heads, decoders folded into q_proj/o_proj) must equal a model with
the original architecture in which each old key/value head is *reconstructed* from the merged
head (x_j = dec_j @ y) and the original queries and o_proj are kept. If the folded decoders
did not commute with the rotation, the logits would differ at every position but the first.
"""

from __future__ import annotations

import pytest
import torch

from kvconvert.arch import get_adapter
from kvconvert.calibration.stats import StatsCollector
from kvconvert.gqa.fold import AttentionWeights
from kvconvert.gqa.layer import LayerShape, merge_layer, to_float64
from tests.conftest import load, token_ids


def _attn(model, i):
    return model.model.layers[i].self_attn


def _weights(model, i) -> AttentionWeights:
    a = _attn(model, i)
    kw = {f"w{p}": getattr(a, f"{p}_proj").weight.detach() for p in "qkvo"}
    for p in "qkv":
        b = getattr(a, f"{p}_proj").bias
        kw[f"b{p}"] = b.detach() if b is not None else None
    return to_float64(AttentionWeights(**kw), "cpu")


def _set(linear, w, b=None):
    linear.weight.data = w.float().clone()
    if b is not None:
        linear.bias.data = b.float().clone()


def _converted_and_reference(src, kv_out, method, rope_keys="complex"):
    from transformers import AutoConfig, AutoModelForCausalLM

    orig = load(src)
    cfg = orig.config.to_dict()
    adapter = get_adapter(cfg["model_type"])
    shape = LayerShape(
        adapter.num_heads(cfg),
        adapter.num_kv_heads(cfg),
        adapter.head_dim(cfg),
        adapter.rope_pairs(cfg),
    )
    with torch.inference_mode(), StatsCollector(orig, adapter, cfg) as col:
        orig(input_ids=token_ids(4, 64, seed=5))
    stats = col.result()

    conv_cfg = AutoConfig.from_pretrained(src, num_key_value_heads=kv_out)
    conv = AutoModelForCausalLM.from_config(conv_cfg).eval()
    keep = {k: v for k, v in orig.state_dict().items() if "k_proj" not in k and "v_proj" not in k}
    conv.load_state_dict(keep, strict=False)  # k/v projections are set per layer below
    ref = load(src)
    d = shape.head_dim
    for i in range(cfg["num_hidden_layers"]):
        w = _weights(orig, i)
        res = merge_layer(w, stats[i], shape, kv_out, method=method, rope_keys=rope_keys)
        nw = res.weights
        c = _attn(conv, i)
        _set(c.q_proj, nw.wq, nw.bq), _set(c.k_proj, nw.wk, nw.bk)
        _set(c.v_proj, nw.wv, nw.bv), _set(c.o_proj, nw.wo)
        # reference: original q/o, each old k/v head rebuilt from the merged head
        wk, wv = torch.empty_like(w.wk), torch.empty_like(w.wv)
        bk = torch.empty_like(w.bk) if w.bk is not None else None
        bv = torch.empty_like(w.bv) if w.bv is not None else None
        for g, (km, vm) in enumerate(zip(res.key_merges, res.value_merges, strict=True)):
            for p, j in enumerate(km.members):
                sl, new = slice(j * d, (j + 1) * d), slice(g * d, (g + 1) * d)
                wk[sl] = km.dec_block(p) @ nw.wk[new]
                wv[sl] = vm.dec_block(p) @ nw.wv[new]
                if bk is not None:
                    bk[sl] = km.dec_block(p) @ nw.bk[new]
                    bv[sl] = vm.dec_block(p) @ nw.bv[new]
        r = _attn(ref, i)
        _set(r.k_proj, wk, bk), _set(r.v_proj, wv, bv)
    ids = token_ids(2, 48, seed=9)
    with torch.inference_mode():
        out_conv, out_ref = conv(input_ids=ids).logits, ref(input_ids=ids).logits
        out_orig = orig(input_ids=ids).logits
    return out_conv, out_ref, out_orig


@pytest.mark.parametrize("family,kv_out", [("llama", 2), ("llama", 1), ("qwen2", 2)])
@pytest.mark.parametrize("method", ["svd", "svd-weights"])
def test_converted_equals_reconstructed_reference(tiny_models, family, kv_out, method):
    conv, ref, orig = _converted_and_reference(tiny_models[family], kv_out, method)
    torch.testing.assert_close(conv, ref, atol=1e-5, rtol=0)
    assert (conv - orig).abs().max() > 1e-4  # the merge did change the model


def test_real_mixing_does_not_commute(tiny_models):
    """Control: a real d x d merge folded into q_proj breaks under RoPE, and the check sees it."""
    conv, ref, _ = _converted_and_reference(tiny_models["llama"], 2, "svd", rope_keys="real")
    assert (conv - ref).abs().max() > 1e-3
