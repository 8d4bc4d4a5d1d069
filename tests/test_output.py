"""The output folder: stock loading, generation, measured KV cache, files, dtype, shards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import kvconvert
from kvconvert.evaluate import kv_cache_bytes
from tests.conftest import FAST, load, logits, token_ids


@pytest.mark.parametrize("family,kv_out", [("llama", 2), ("mistral", 2), ("qwen2", 1)])
def test_stock_load_generate_and_cache_bytes(tiny_models, tmp_path, family, kv_out):
    src = tiny_models[family]
    out = kvconvert.convert(str(src), str(tmp_path / "out"), kv_heads=kv_out, **FAST)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == kv_out and "auto_map" not in cfg
    orig, conv = load(src), load(out)
    assert type(conv) is type(orig)  # stock class, no remote code
    ids = token_ids(2, 24)
    gen = conv.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 32)
    before, after = kv_cache_bytes(orig, ids), kv_cache_bytes(conv, ids)
    assert after * orig.config.num_key_value_heads == before * kv_out
    report = json.loads((out / "kvconvert.json").read_text())
    per_token = report["kv_bytes_per_token"]
    assert per_token["before"] * ids.numel() == before
    assert per_token["after"] * ids.numel() == after
    assert len(report["layers"]) == orig.config.num_hidden_layers


def test_tied_embeddings_stay_tied(tiny_models, tmp_path):
    out = kvconvert.convert(str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, **FAST)
    m = load(out)
    assert m.config.tie_word_embeddings
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_dtype_kept_or_changed(tiny_bf16, tmp_path):
    out = kvconvert.convert(str(tiny_bf16), str(tmp_path / "a"), kv_heads=2, **FAST)
    assert {p.dtype for p in load(out, dtype="auto").parameters()} == {torch.bfloat16}
    out32 = kvconvert.convert(
        str(tiny_bf16), str(tmp_path / "b"), kv_heads=2, dtype="float32", **FAST
    )
    assert {p.dtype for p in load(out32, dtype="auto").parameters()} == {torch.float32}
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"


def test_sharded_output_matches_single_file(tiny_models, tmp_path):
    src = tiny_models["mistral"]
    one = kvconvert.convert(str(src), str(tmp_path / "one"), kv_heads=2, **FAST)
    many = kvconvert.convert(
        str(src), str(tmp_path / "many"), kv_heads=2, max_shard_size="40KB", **FAST
    )
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((many / s).is_file() for s in shards)
    assert not (many / "model.safetensors").exists()
    ids = token_ids()
    torch.testing.assert_close(logits(many, ids), logits(one, ids), atol=0, rtol=0)


def test_side_files_copied_and_card_written(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = kvconvert.convert(str(src), str(tmp_path / "out"), kv_heads=2, **FAST)
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "kvconvert" in card and "KV cache per token" in card


def test_hub_source_card_has_base_model(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, list(allow_patterns)))
        return str(tiny_models["llama"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = kvconvert.convert(
        "someorg/tiny-llama", str(tmp_path / "o"), kv_heads=2, revision="v1", **FAST
    )
    assert calls[0][0] == "someorg/tiny-llama" and calls[0][1] == "v1"
    assert "*.safetensors" in calls[0][2] and "*.py" not in calls[0][2]
    assert "base_model: someorg/tiny-llama" in (out / "README.md").read_text()


def test_same_seed_same_bytes(tiny_models, tmp_path):
    src = str(tiny_models["qwen2"])
    a = kvconvert.convert(src, str(tmp_path / "a"), kv_heads=2, **FAST)
    b = kvconvert.convert(src, str(tmp_path / "b"), kv_heads=2, **FAST)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
