"""--refine-steps: fitting merged layers to the original attention's outputs.

What a user gets: a model closer to the original on text it was not calibrated on, the
closed-form merge kept where a fit would make it worse,
layers that keep their heads untouched, and a clear refusal where it is not available. That
both engines refine to the same weights (refinement is on by default) is
tests/test_sequential.py::test_sequential_equals_whole_model_path; two torchrun ranks equal
one process in test_two_gloo_ranks_equal_one_process.
"""

from __future__ import annotations

import json

import pytest
import torch

import kvconvert
from kvconvert.calibration.data import sample_from_model
from kvconvert.errors import KVConvertError
from kvconvert.evaluate import kl_per_token
from tests.conftest import load, tensors, token_ids

#: enough calibration for a fit that generalises on the tiny models (they are random)
CALIB = {"num_samples": 16, "seq_len": 64, "batch_size": 8, "progress": False}


def held_out_kl(original, converted) -> float:
    return kl_per_token(load(original), load(converted), token_ids(8, 64, seed=123))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_refining_brings_the_output_closer_on_held_out_tokens(tiny_models, tmp_path, family):
    src = tiny_models[family]
    plain = kvconvert.convert(
        str(src), str(tmp_path / "plain"), kv_heads=1, refine_steps=0, **CALIB
    )
    refined = kvconvert.convert(str(src), str(tmp_path / "refined"), kv_heads=1, **CALIB)
    before, after = held_out_kl(src, plain), held_out_kl(src, refined)
    assert after < 0.95 * before, (before, after)  # random weights: a modest gain
    report = json.loads((refined / "kvconvert.json").read_text())
    for layer in report["layers"]:
        err = layer["refine_error"]
        assert err["after"] < err["before"]
    assert report["recipe"]["refine_steps"] is None  # the default, resolved to 50 in the run
    assert "refine_error" not in json.loads((plain / "kvconvert.json").read_text())["layers"][0]


def test_refining_stories260k_lowers_kl_on_text_it_did_not_see(stories, tmp_path):
    """A real (pretrained) model, 4 -> 1 KV heads: a clear gain on text it did not see."""
    opts = {"num_samples": 32, "seq_len": 128, "batch_size": 16, "progress": False}
    plain = kvconvert.convert(str(stories), str(tmp_path / "p"), kv_heads=1, refine_steps=0, **opts)
    refined = kvconvert.convert(str(stories), str(tmp_path / "r"), kv_heads=1, **opts)
    held = sample_from_model(load(stories), 1, 8, 128, batch_size=8, seed=1234)  # seed 0 calibrated
    before = kl_per_token(load(stories), load(plain), held)
    after = kl_per_token(load(stories), load(refined), held)
    assert after < 0.9 * before, (before, after)  # measured: 4.15 -> 3.59


def test_a_fit_that_would_be_worse_keeps_the_merge(tiny_models, tmp_path):
    src = str(tiny_models["llama"])
    plain = kvconvert.convert(src, str(tmp_path / "p"), kv_heads=2, refine_steps=0, **CALIB)
    wild = kvconvert.convert(src, str(tmp_path / "w"), kv_heads=2, refine_lr=1e3, **CALIB)
    a, b = tensors(plain), tensors(wild)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    for layer in json.loads((wild / "kvconvert.json").read_text())["layers"]:
        assert layer["refine_error"]["after"] == layer["refine_error"]["before"]


def test_layers_that_keep_their_heads_are_not_touched(tiny_models, tmp_path):
    src = str(tiny_models["llama"])
    opts = dict(kv_heads_per_layer="4,1", format="kvconvert", **CALIB)
    plain = kvconvert.convert(src, str(tmp_path / "p"), refine_steps=0, **opts)
    refined = kvconvert.convert(src, str(tmp_path / "r"), **opts)
    a, b = tensors(plain), tensors(refined)
    for proj in "qkvo":
        name = f"model.layers.{{}}.self_attn.{proj}_proj.weight"
        assert torch.equal(a[name.format(0)], b[name.format(0)])  # kept 4 of 4: as solved
        assert not torch.equal(a[name.format(1)], b[name.format(1)])  # merged 4 -> 1: refined
    layers = json.loads((refined / "kvconvert.json").read_text())["layers"]
    assert "refine_error" not in layers[0] and "refine_error" in layers[1]


def test_refining_an_architecture_without_in_process_attention_is_refused(tmp_path):
    from tests.models import build

    src = build("gpt2", tmp_path / "gpt2")
    with pytest.raises(KVConvertError, match="refine_steps is not available for 'gpt2'"):
        kvconvert.convert(str(src), str(tmp_path / "o"), kv_heads=1, refine_steps=5, **CALIB)
    assert not (tmp_path / "o").exists()
    out = kvconvert.convert(str(src), str(tmp_path / "d"), kv_heads=1, **CALIB)  # default: off
    assert "refine_error" not in json.loads((out / "kvconvert.json").read_text())["layers"][0]


@pytest.mark.parametrize("bad", [{"refine_steps": -1}, {"refine_lr": 0.0}, {"refine_rows": -1}])
def test_bad_refine_options_are_named(tiny_models, tmp_path, bad):
    key = next(iter(bad))
    with pytest.raises(KVConvertError, match=key):
        kvconvert.convert(str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=1, **bad)


@pytest.mark.parametrize(
    "case", ["llama", "mistral-sliding", "qwen2-bias", "projected", "sliding-4"]
)
def test_rows_output_equals_the_modules_forward_at_those_rows(case):
    """The fit's cheap forward (queries at a few positions, keys at all) is the module's
    own forward, row for row, with the engines' causal (or sliding) mask."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from kvconvert.compat import cache_kwargs
    from kvconvert.gqa.refine import rows_output
    from kvconvert.modeling.export import attention_module

    torch.manual_seed(0)
    window = {"mistral-sliding": 5, "sliding-4": 4}.get(case)
    h, g, d, hid, t = 4, 2, 8, 32, 12
    cfg = {
        "model_type": "kvconvert",
        "hidden_size": hid,
        "num_attention_heads": h,
        "num_key_value_heads": [g],
        "key_projection_heads": [4 if case == "projected" else 0],
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "head_dim": d,
        "vocab_size": 10,
        "q_bias": case == "qwen2-bias",
        "k_bias": case == "qwen2-bias",
        "v_bias": case == "qwen2-bias",
        "o_bias": False,
        "sliding_window": window,
        "layer_types": ["sliding_attention" if window else "full_attention"],
    }
    attn = attention_module(cfg, 0, {}, "sdpa")
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, t, hid)
    pos = torch.arange(t).unsqueeze(0)
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=hid, num_attention_heads=h, head_dim=d))
    cos, sin = rope(x, pos)
    llama = LlamaConfig(hidden_size=hid, num_attention_heads=h, sliding_window=window)
    llama._attn_implementation = "sdpa"
    make = create_sliding_window_causal_mask if window else create_causal_mask
    mask = make(config=llama, inputs_embeds=x, attention_mask=None, position_ids=pos,
                **cache_kwargs(None))  # fmt: skip
    full = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)[0]
    rows = torch.tensor([0, 3, 4, 10, 11])
    kw = {"hidden_states": x, "position_embeddings": (cos, sin), "attention_mask": mask}
    got = rows_output(attn, kw, rows)
    torch.testing.assert_close(got, full[:, rows], atol=1e-5, rtol=1e-5)
