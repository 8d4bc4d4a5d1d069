"""Per-layer outputs in the DeciLM / Nemotron-NAS layout (``--format deci``) as engines and
users read them: the config engines parse, the same logits as kvconvert's own format."""

from __future__ import annotations

import json

import pytest
import torch

import kvconvert
from kvconvert.errors import KVConvertError
from tests.conftest import FAST, load, token_ids
from tests.modeling.test_remote import logits_without_kvconvert
from tests.models import llama_deci_width


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """llama.cpp's and vLLM's rule (int(2 * mult * hidden / 3), rounded up to 256)."""
    size = int(2 * ffn_mult * hidden / 3)
    return -(-size // 256) * 256


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One source converted to per-layer heads 2,1 twice: deci (the default) and kvconvert."""
    root = tmp_path_factory.mktemp("deci")
    src = llama_deci_width(root / "src")
    deci = kvconvert.convert(str(src), str(root / "deci"), kv_heads_per_layer="2,1", **FAST)
    own = kvconvert.convert(
        str(src), str(root / "own"), kv_heads_per_layer="2,1", format="kvconvert", **FAST
    )
    return src, deci, own


def test_config_is_what_engines_read(pair):
    src, deci, own = pair
    cfg = json.loads((deci / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["model_type"] == "nemotron-nas"
    assert "num_key_value_heads" not in cfg
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    blocks = cfg["block_configs"]
    assert [heads // b["attention"]["n_heads_in_group"] for b in blocks] == [2, 1]
    for b in blocks:
        assert b["attention"]["no_op"] is False and b["attention"]["replace_with_linear"] is False
        assert ffn_width(b["ffn"]["ffn_mult"], hidden) == source["intermediate_size"]
    assert cfg["rope_parameters"] == source["rope_parameters"]
    report = json.loads((deci / "kvconvert.json").read_text())
    assert report["target"]["format"] == "deci" and "format_note" not in report["target"]
    assert json.loads((own / "kvconvert.json").read_text())["target"]["format"] == "kvconvert"
    assert sorted(p.name for p in deci.glob("*.py")) == [
        "configuration_kvconvert_deci.py",
        "modeling_kvconvert_deci.py",
    ]
    # the tensors are the kvconvert format's, name for name and shape for shape
    from safetensors import safe_open

    shapes = []
    for folder in (deci, own):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            shapes.append({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    assert shapes[0] == shapes[1]
    assert shapes[0]["model.layers.1.self_attn.k_proj.weight"] == (16, 64)
    assert "vllm serve" in (deci / "README.md").read_text()


#: the block keys mlx-lm's nemotron-nas model accepts: it builds frozen dataclasses with
#: ``AttentionConfig(**block["attention"])``, so any other key (such as Puzzletron's
#: ``num_key_value_heads``) stops it with a TypeError (docs/output-format.md)
MLX_ATTENTION_KEYS = {
    "no_op", "replace_with_linear", "sparsify", "n_heads_in_group", "window_length",
    "num_sink_tokens", "use_prefill_window_in_sink_attention", "unshifted_sink",
}  # fmt: skip
MLX_FFN_KEYS = {"no_op", "replace_with_linear", "sparsify", "ffn_mult"}


def test_block_keys_are_ones_every_deci_reader_accepts(pair):
    _, deci, _ = pair
    for block in json.loads((deci / "config.json").read_text())["block_configs"]:
        assert set(block) == {"attention", "ffn"}
        assert set(block["attention"]) <= MLX_ATTENTION_KEYS
        assert set(block["ffn"]) <= MLX_FFN_KEYS


def test_same_logits_as_kvconvert_format_without_kvconvert(pair, tmp_path):
    _, deci, own = pair
    ids = token_ids()
    got_deci, got_own = logits_without_kvconvert([deci, own], ids, tmp_path)
    torch.testing.assert_close(got_deci, got_own, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_engines_read_blocks_as_attributes_and_save_plain_json(pair, tmp_path):
    """vLLM and others read ``config.block_configs[i].attention.n_heads_in_group``."""
    _, deci, _ = pair
    model = load(deci, trust_remote_code=True)
    blocks = model.config.block_configs
    assert [model.config.num_attention_heads // b.attention.n_heads_in_group for b in blocks] == [
        2,
        1,
    ]
    assert hasattr(blocks[0].ffn, "ffn_mult") and not hasattr(blocks[0].ffn, "intermediate_size")
    assert [layer.self_attn.k_proj.out_features for layer in model.model.layers] == [32, 16]
    model.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["block_configs"] == json.loads((deci / "config.json").read_text())["block_configs"]
    ids = token_ids()
    reloaded = load(tmp_path / "again", trust_remote_code=True)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@torch.inference_mode()
def test_switching_attention_after_load_reaches_every_layer(pair):
    _, deci, _ = pair
    ids = token_ids()
    model = load(deci, trust_remote_code=True, attn_implementation="sdpa")
    model.set_attn_implementation("eager")
    assert all(
        layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers
    )
    eager = load(deci, trust_remote_code=True, attn_implementation="eager")
    torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits)


def test_auto_falls_back_with_the_reason(tiny_models, tmp_path, capfd):
    """The tiny llama's MLP (128) is not a multiple of 256: kvconvert's own code, and why."""
    out = kvconvert.convert(
        str(tiny_models["llama"]), str(tmp_path / "out"), kv_heads_per_layer="2,1", **FAST
    )
    target = json.loads((out / "kvconvert.json").read_text())["target"]
    assert target["format"] == "kvconvert"
    assert "128 is not a multiple of 256" in target["format_note"]
    assert "128 is not a multiple of 256" in capfd.readouterr().err
    assert json.loads((out / "config.json").read_text())["model_type"] == "kvconvert"


def test_format_deci_refused_before_loading(tiny_models, tmp_path, monkeypatch):
    """What cannot be deci is refused in one line before any model is loaded."""
    import transformers

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    cases = {
        "qwen2": ({"kv_heads_per_layer": "2,1"}, "this model has q, k, v biases"),
        "llama": ({"kv_budget": 0.5}, "the MLP width 128 is not a multiple of 256"),
    }
    for family, (opts, why) in cases.items():
        with pytest.raises(KVConvertError, match=f"format='deci': .*{why}"):
            kvconvert.convert(
                str(tiny_models[family]), str(tmp_path / family), format="deci", **opts, **FAST
            )
        assert not (tmp_path / family).exists()
    with pytest.raises(KVConvertError, match="format='deci' is for per-layer KV heads"):
        kvconvert.convert(
            str(tiny_models["llama"]), str(tmp_path / "u"), kv_heads=2, format="deci", **FAST
        )
    with pytest.raises(KVConvertError, match="format applies to target='gqa'"):
        kvconvert.convert(
            str(tiny_models["llama"]), str(tmp_path / "p"), target="pod", format="deci", **FAST
        )


def test_check_passes_with_the_reported_cache_bytes(pair):
    """``kvconvert check``: generate() agrees with the uncached forward and the cache holds
    the bytes kvconvert.json promises (per-layer heads 2 and 1)."""
    from kvconvert.check import check

    _, deci, _ = pair
    res = check(deci, new_tokens=8)
    assert res.ok, res.problems
    assert res.model_class == "KVConvertDeciForCausalLM"
    per_token = json.loads((deci / "kvconvert.json").read_text())["kv_bytes_per_token"]["after"]
    assert per_token == 2 * (2 + 1) * 16 * 4  # keys + values, 3 KV heads in all, float32
    assert res.bytes == res.expected_bytes == per_token * res.prompt_tokens
