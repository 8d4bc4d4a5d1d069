"""gpt_neox / opt / gpt2 end to end: transformers has no GQA for them, so the output carries
kvconvert's modeling code. Identity reproduces the stock logits (also where kvconvert is not
importable), a halved-KV output loads with trust_remote_code, generates with a cache, halves
the measured cache, and sdpa and eager attention agree."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import kvconvert
from kvconvert.errors import KVConvertError
from kvconvert.evaluate import kv_cache_bytes
from kvconvert.inspection import inspect_model
from tests.conftest import FAST, load, logits, token_ids
from tests.modeling.test_remote import logits_without_kvconvert
from tests.models import REMOTE_ARCHS

CLASSES = {
    "gpt_neox": "KVConvertGPTNeoXForCausalLM",
    "opt": "KVConvertOPTForCausalLM",
    "gpt2": "KVConvertGPT2LMHeadModel",
}


@pytest.fixture(scope="module")
def converted(remote_arch_models, tmp_path_factory):
    """arch -> (source, identity output, halved output)."""
    root = tmp_path_factory.mktemp("remote-out")
    out = {}
    for arch in REMOTE_ARCHS:
        src = remote_arch_models[arch]
        kv = load(src).config.num_attention_heads  # all three are MHA
        ident = kvconvert.convert(str(src), str(root / f"{arch}-id"), kv_heads=kv, **FAST)
        half = kvconvert.convert(str(src), str(root / f"{arch}-half"), kv_heads=kv // 2, **FAST)
        out[arch] = (src, ident, half)
    return out


@pytest.mark.parametrize("arch", REMOTE_ARCHS)
def test_identity_reproduces_stock_logits(converted, arch):
    src, ident, _ = converted[arch]
    cfg = json.loads((ident / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == [CLASSES[arch]] and cfg["model_type"] == f"kvconvert_{arch}"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"modeling_kvconvert_{arch}.{CLASSES[arch]}"
    assert (ident / f"modeling_kvconvert_{arch}.py").is_file()
    assert (ident / f"configuration_kvconvert_{arch}.py").is_file()
    assert "trust_remote_code=True" in (ident / "README.md").read_text()
    assert json.loads((ident / "kvconvert.json").read_text())["target"]["remote_code"]
    for k in ("architectures", "auto_map", "model_type", "num_key_value_heads"):
        cfg.pop(k, None), src_cfg.pop(k, None)
    assert cfg == src_cfg  # every stock setting (positions, norms, rotary_pct...) verbatim
    model = load(ident, trust_remote_code=True)
    assert type(model).__name__ == CLASSES[arch]
    ids = token_ids(2, 40)
    torch.testing.assert_close(logits(model, ids), logits(src, ids), atol=1e-5, rtol=0)


def test_identity_loads_without_kvconvert(converted, tmp_path):
    outs = [converted[a][1] for a in REMOTE_ARCHS]
    ids = token_ids()
    for arch, got in zip(REMOTE_ARCHS, logits_without_kvconvert(outs, ids, tmp_path), strict=True):
        torch.testing.assert_close(got, logits(converted[arch][0], ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", REMOTE_ARCHS)
@torch.inference_mode()
def test_halved_loads_generates_and_halves_cache(converted, arch):
    src, _, half = converted[arch]
    orig = load(src)
    conv = load(half, trust_remote_code=True)
    assert conv.config.num_key_value_heads == orig.config.num_attention_heads // 2
    ids = token_ids(2, 24)
    assert kv_cache_bytes(conv, ids) * 2 == kv_cache_bytes(orig, ids)
    assert (logits(conv, ids) - logits(orig, ids)).abs().max() > 1e-3  # really merged
    prompt = token_ids(1, 8)
    gen = conv.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(12):  # the cache changes nothing: uncached argmax, token by token
        nxt = conv(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("arch", REMOTE_ARCHS)
@torch.inference_mode()
def test_sdpa_and_eager_agree(converted, arch):
    half = converted[arch][2]
    ids = token_ids()
    sdpa = load(half, trust_remote_code=True, attn_implementation="sdpa")
    eager = load(half, trust_remote_code=True, attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(sdpa, ids), logits(eager, ids), atol=1e-5, rtol=1e-5)


def test_gpt_neox_written_as_separate_projections(converted):
    _, _, half = converted["gpt_neox"]
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    pre = "gpt_neox.layers.0.attention."
    assert not any("query_key_value" in n for n in names)
    assert shapes[pre + "q_proj.weight"] == (64, 64) and shapes[pre + "q_proj.bias"] == (64,)
    assert shapes[pre + "k_proj.weight"] == shapes[pre + "v_proj.weight"] == (32, 64)
    assert "lm_head.weight" in names and "embed_out.weight" not in names


def test_gpt2_conv1d_written_back_fused_and_transposed(converted):
    """c_attn stays one Conv1D, (in, out) = (64, (4 + 2 * 2) * 16), columns [q | k | v]."""
    src, _, half = converted["gpt2"]
    name = "transformer.h.0.attn.c_attn.weight"
    with (
        safe_open(str(src / "model.safetensors"), "pt") as a,
        safe_open(str(half / "model.safetensors"), "pt") as b,
    ):
        old, new = a.get_tensor(name), b.get_tensor(name)
        assert tuple(b.get_slice("transformer.h.0.attn.c_attn.bias").get_shape()) == (128,)
    assert old.shape == (64, 192) and new.shape == (64, 128)
    assert not torch.equal(new[:, :64], old[:, :64])  # queries absorbed the key merge


def test_unsupported_options_refused(remote_arch_models, tmp_path):
    src = str(remote_arch_models["opt"])
    with pytest.raises(KVConvertError, match="kvconvert's modeling code"):
        kvconvert.convert(src, str(tmp_path / "a"), kv_heads=2, pipeline="sequential", **FAST)
    with pytest.raises(KVConvertError, match="not available for 'opt'"):
        kvconvert.convert(src, str(tmp_path / "b"), kv_heads_per_layer="2,1", **FAST)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gpt2_inspect_reads_its_own_config_names(remote_arch_models):
    folder = remote_arch_models["gpt2"]
    info = inspect_model(str(folder))  # n_head / n_embd / n_layer, not the common names
    assert info["supported"] and info["targets"] == {"gqa": "kvconvert"}
    assert (info["num_layers"], info["num_attention_heads"], info["head_dim"]) == (2, 4, 16)
    ids = token_ids(1, 16)
    assert info["kv_bytes_per_token"] * ids.numel() == kv_cache_bytes(load(folder), ids)


def test_gpt2_saved_from_the_bare_base_model(remote_arch_models, tmp_path):
    """openai-community/gpt2 stores ``h.0.attn.c_attn.weight`` (no ``transformer.``): the
    output keeps the checkpoint's names and still loads and reproduces the logits."""
    src = tmp_path / "bare"
    load(remote_arch_models["gpt2"]).transformer.save_pretrained(src)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert "h.0.attn.c_attn.weight" in f.keys()
    out = kvconvert.convert(str(src), str(tmp_path / "o"), kv_heads=4, **FAST)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "h.0.attn.c_attn.weight" in f.keys()
    ids = token_ids()
    conv = load(out, trust_remote_code=True)
    torch.testing.assert_close(logits(conv, ids), logits(src, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits(src, ids), logits(remote_arch_models["gpt2"], ids), atol=0, rtol=0
    )
