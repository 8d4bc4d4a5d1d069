"""Remote-code outputs (per-layer KV heads, post-RoPE key projection) as a user loads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kvconvert
from kvconvert.evaluate import kv_cache_bytes
from tests.conftest import FAMILIES, FAST, load, logits, token_ids

# Loads each folder in a fresh interpreter in which `import kvconvert` fails and the worktree
# root is off sys.path, as on a machine where kvconvert is not installed. (Only the root
# itself: a virtual environment inside the checkout must keep its site-packages.)
LOADER = textwrap.dedent(
    """
    import sys
    class NoKVConvert:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "kvconvert":
                raise ImportError("kvconvert is not installed here")
    sys.meta_path.insert(0, NoKVConvert())
    root = sys.argv[1]
    sys.path[:] = [p for p in sys.path if p not in ("", ".", root, root.rstrip("/") + "/")]
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[2])
    for folder in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__.startswith("KVConvert"), type(model)
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, folder + "/logits.pt")
    try:
        import kvconvert  # noqa: F401
        raise SystemExit("kvconvert was importable")
    except ImportError:
        pass
    """
)


def test_identity_loads_without_kvconvert(tiny_models, tmp_path):
    """Full-rank projection (every family) and full per-layer budgets reproduce the source."""
    outs, sources = [], []
    for family in FAMILIES:
        src = tiny_models[family]
        kv = load(src).config.num_key_value_heads
        out = kvconvert.convert(
            str(src), str(tmp_path / family), kv_heads=kv, rope_keys="project", **FAST
        )
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_kvconvert.KVConvertForCausalLM"
        assert cfg["base_model_type"] == family and cfg["key_projection_heads"] == [kv, kv]
        assert (out / "modeling_kvconvert.py").is_file()
        assert "trust_remote_code=True" in (out / "README.md").read_text()
        outs.append(out)
        sources.append(src)
    ids = token_ids()
    for src, got in zip(sources, logits_without_kvconvert(outs, ids, tmp_path), strict=True):
        torch.testing.assert_close(got, logits(src, ids), atol=1e-5, rtol=0)


def logits_without_kvconvert(outs: list, ids: torch.Tensor, tmp_path) -> list[torch.Tensor]:
    """Each output's logits on ``ids``, loaded with trust_remote_code=True in a fresh process
    where importing kvconvert fails (the remote code must stand alone)."""
    torch.save(ids, tmp_path / "ids.pt")
    root = os.path.dirname(os.path.dirname(kvconvert.__file__))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    res = subprocess.run(
        [sys.executable, "-c", LOADER, root, str(tmp_path / "ids.pt"), *map(str, outs)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return [torch.load(out / "logits.pt") for out in outs]


def test_full_budget_and_uniform_list_stay_stock(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    ids = token_ids()
    for name, opts in {"budget": {"kv_budget": 1.0}, "list": {"kv_heads_per_layer": "2,2"}}.items():
        out = kvconvert.convert(str(src), str(tmp_path / name), **opts, **FAST)
        cfg = json.loads((out / "config.json").read_text())
        assert "auto_map" not in cfg and cfg["model_type"] == "qwen2"
        assert not (out / "modeling_kvconvert.py").exists()
        assert type(load(out)) is type(load(src))
    torch.testing.assert_close(
        logits(tmp_path / "budget", ids), logits(src, ids), atol=1e-5, rtol=0
    )


@pytest.fixture(scope="module")
def mixed(tiny_models, tmp_path_factory):
    """Llama (4 KV heads, 2 layers) -> 2 and 1 KV heads, keys projected after RoPE."""
    out = tmp_path_factory.mktemp("mixed") / "out"
    return kvconvert.convert(
        str(tiny_models["llama"]),
        str(out),
        kv_heads_per_layer="2,1",
        rope_keys="project",
        **FAST,
    )


@torch.inference_mode()
def test_cached_greedy_equals_uncached_argmax(mixed):
    model = load(mixed, trust_remote_code=True)
    prompt = token_ids(1, 8)
    gen = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(32):  # full-sequence forward without a cache, argmax of the last position
        nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)
    no_cache = model.generate(
        prompt, max_new_tokens=32, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(no_cache, seq)


@torch.inference_mode()
def test_batch_with_left_padding_matches_single(mixed):
    model = load(mixed, trust_remote_code=True)
    a, b = token_ids(1, 12, seed=1)[0], token_ids(1, 7, seed=2)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(12), torch.cat([torch.zeros(5), torch.ones(7)])]).long()
    gen = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
    )
    for row, single in enumerate((a, b)):
        ref = model.generate(single[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(gen[row, -10:], ref[0, -10:])


@torch.inference_mode()
def test_sdpa_and_eager_agree(mixed):
    ids = token_ids()
    sdpa = load(mixed, trust_remote_code=True, attn_implementation="sdpa")(input_ids=ids).logits
    eager = load(mixed, trust_remote_code=True, attn_implementation="eager")(input_ids=ids).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_cache_bytes_equal_per_layer_formula(mixed):
    model = load(mixed, trust_remote_code=True)
    cfg, ids = model.config, token_ids(2, 24)
    measured = kv_cache_bytes(model, ids)
    per_token = 2 * sum(cfg.num_key_value_heads) * cfg.head_dim * 4  # keys + values, float32
    assert cfg.num_key_value_heads == [2, 1]
    assert measured == per_token * ids.numel()
    report = json.loads((mixed / "kvconvert.json").read_text())
    assert report["kv_bytes_per_token"]["after"] == per_token
    assert report["target"]["num_key_value_heads"] == [2, 1]


@torch.inference_mode()
def test_copy_and_switch_attention_after_load(mixed):
    """A loaded model deep-copies and pickles (heal and users copy models), and switching the
    attention implementation after loading reaches every layer."""
    import copy
    import io

    model = load(mixed, trust_remote_code=True, attn_implementation="sdpa")
    ids = token_ids()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    torch.save(model, io.BytesIO())
    model.set_attn_implementation("eager")
    eager = load(mixed, trust_remote_code=True, attn_implementation="eager")
    assert all(
        m.config._attn_implementation == "eager"
        for m in model.model.modules()
        if hasattr(m, "config") and hasattr(m, "q_proj")
    )
    torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits)
