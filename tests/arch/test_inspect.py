"""``kvconvert inspect``: facts from config and safetensors headers only, matching reality."""

from __future__ import annotations

import json
import shutil
import struct

from click.testing import CliRunner

import kvconvert
from kvconvert.cli import main
from kvconvert.evaluate import kv_cache_bytes
from kvconvert.inspection import inspect_model
from tests.conftest import load, token_ids


def test_facts_match_the_loaded_model(arch_models, tiny_models):
    for folder in (arch_models["phi3"], arch_models["qwen3"], tiny_models["mistral"]):
        info = inspect_model(str(folder))
        model = load(folder)
        ids = token_ids(1, 16)
        assert info["supported"] and info["weights_found"]
        assert info["num_key_value_heads"] == model.config.num_key_value_heads
        assert info["kv_bytes_per_token"] * ids.numel() == kv_cache_bytes(model, ids)
    phi3 = inspect_model(str(arch_models["phi3"]))
    assert phi3["rotary_dims"] == "4 of 8" and "qkv_proj" in phi3["attention"]
    assert phi3["kv_bytes_per_token_by_kv_heads"] == {4: 512, 2: 256, 1: 128}
    assert "RMSNorm" in inspect_model(str(arch_models["qwen3"]))["qk_norm"]


def test_reads_headers_only(arch_models, tmp_path):
    """Weights whose data is cut off after the header still inspect: no tensor is read."""
    src = arch_models["gemma"]
    dst = tmp_path / "gemma"
    shutil.copytree(src, dst)
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    (dst / "model.safetensors").write_bytes(raw[: 8 + n])
    info = inspect_model(str(dst))
    assert info["head_dim"] == 32 and info["weights_found"]
    assert kvconvert.inspect_model(str(dst)) == info  # the public API


def test_cli_supported_and_unsupported(arch_models, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["inspect", str(arch_models["gemma2"])])
    assert ok.exit_code == 0 and "supported (gemma2" in ok.output and "head_dim 24" in ok.output
    as_json = runner.invoke(main, ["inspect", str(arch_models["gemma2"]), "--json"])
    assert json.loads(as_json.output)["targets"] == {
        "gqa": "stock",
        "pod": "kvconvert",
        "gqa,pod": "kvconvert",
    }
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt2"}')
    res = runner.invoke(main, ["inspect", str(bad)])
    assert res.exit_code == 1
    assert "'gpt2' is not supported" in res.output and "qwen3" in res.output
    assert "gpt_neox, llama" in res.output and ", opt," in res.output  # PoD-only ones too
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen3"}')
    res = runner.invoke(main, ["inspect", str(broken)])
    assert res.exit_code == 1 and "config.json lacks 'num_attention_heads'" in res.output
