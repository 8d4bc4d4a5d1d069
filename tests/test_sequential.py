"""The layer-sequential engine: equal to the whole-model path, deterministic, resumable,
guarded (NaN, disk), --dry-run, and torch.distributed (two gloo ranks on CPU)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvconvert
from kvconvert.engines import sequential
from kvconvert.errors import KVConvertError
from tests.conftest import (
    FAST,
    interrupt_after_first_layer,
    load,
    logits,
    tensors,
    token_ids,
    torchrun,
)


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_sequential_equals_whole_model_path(tiny_models, tmp_path, family):
    src = str(tiny_models[family])
    seq = kvconvert.convert(src, str(tmp_path / "seq"), kv_heads=2, pipeline="sequential", **FAST)
    whole = kvconvert.convert(src, str(tmp_path / "whole"), kv_heads=2, pipeline="whole", **FAST)
    a, b = tensors(seq), tensors(whole)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_propagate_converted_changes_only_later_layers(tiny_models, tmp_path):
    src = str(tiny_models["llama"])
    orig = kvconvert.convert(src, str(tmp_path / "o"), kv_heads=2, **FAST)
    conv = kvconvert.convert(src, str(tmp_path / "c"), kv_heads=2, propagate="converted", **FAST)
    a, b = tensors(orig), tensors(conv)
    k0, k1 = "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(a[k0], b[k0])  # layer 0 sees the embeddings either way
    assert not torch.allclose(a[k1], b[k1])  # layer 1 calibrates on converted layer-0 outputs
    assert logits(conv, token_ids(1, 16)).isfinite().all()


def test_deterministic_and_offload_identical(tiny_models, tmp_path):
    src = str(tiny_models["qwen2"])
    one = kvconvert.convert(src, str(tmp_path / "1"), kv_heads=2, **FAST)
    two = kvconvert.convert(src, str(tmp_path / "2"), kv_heads=2, **FAST)
    off = kvconvert.convert(src, str(tmp_path / "3"), kv_heads=2, offload_activations=True, **FAST)
    assert weight_bytes(one) == weight_bytes(two) == weight_bytes(off)


def test_interrupt_then_resume_matches_uninterrupted(tiny_models, tmp_path, monkeypatch):
    src = str(tiny_models["mistral"])
    opts = dict(kv_heads=2, max_shard_size="40KB", **FAST)
    ref = kvconvert.convert(src, str(tmp_path / "ref"), **opts)

    out = tmp_path / "out"
    resume_normally = interrupt_after_first_layer(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        kvconvert.convert(src, str(out), **opts)
    work = tmp_path / "out.kvconvert-work"
    assert not out.exists() and (work / sequential.STATE_DIR / "state.json").is_file()

    resume_normally()
    with pytest.raises(KVConvertError, match="fingerprint mismatch"):
        kvconvert.convert(src, str(out), resume=True, **{**opts, "seed": 7})
    assert work.is_dir()  # a mismatch keeps the progress
    kvconvert.convert(src, str(out), resume=True, **opts)
    assert not work.exists()
    assert weight_bytes(out) == weight_bytes(ref)
    assert (out / "model.safetensors.index.json").read_text() == (
        ref / "model.safetensors.index.json"
    ).read_text()


def test_resume_without_work_folder_is_refused(tiny_models, tmp_path):
    with pytest.raises(KVConvertError, match="no interrupted run"):
        kvconvert.convert(
            str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, resume=True, **FAST
        )


@pytest.mark.parametrize(
    "tensor,method,message",
    [
        ("model.layers.0.mlp.down_proj.weight", "svd", "layer 0: its outputs contain NaN"),
        ("model.layers.1.self_attn.k_proj.weight", "svd-weights", "layer 1: source tensor k"),
    ],
)
def test_nan_in_source_names_the_layer(tiny_models, tmp_path, tensor, method, message):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["llama"], bad)
    state = load_file(bad / "model.safetensors")
    state[tensor][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    calib = bad / "calib.jsonl"  # sampling from a NaN model would fail before calibration
    calib.write_text(json.dumps({"input_ids": token_ids(1, 200)[0].tolist()}) + "\n")
    with pytest.raises(KVConvertError, match=message):
        kvconvert.convert(
            str(bad), str(tmp_path / "o"), kv_heads=2, method=method, calibration=str(calib), **FAST
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no work folder


def test_dry_run_prints_plan_and_writes_nothing(tiny_models, tmp_path, capsys):
    out = tmp_path / "o"
    kvconvert.convert(str(tiny_models["llama"]), str(out), kv_heads=2, dry_run=True, **FAST)
    text = capsys.readouterr().out
    assert "2 layers" in text and "4 -> 2 KV heads" in text and "[[0, 1], [2, 3]]" in text
    assert "1024 -> 512 bytes per token" in text  # 2 layers x (k, v) x 4 heads x 16 x fp32
    assert "50 Adam steps per merged layer at 32 of 32 query positions" in text  # defaults
    share = int(re.search(r"about (\d+)% of the conversion's arithmetic", text).group(1))
    assert 50 < share < 100  # the fit dominates on a tiny model
    assert not any(tmp_path.iterdir())


def test_refinement_share_follows_its_settings():
    """--dry-run's share: none without steps or merged layers, less with fewer query rows."""
    from kvconvert.gqa.refine import arithmetic_share

    cfg = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536}  # fmt: skip
    share = [arithmetic_share(cfg, [1] * 30, 8192, 256, 8, 50, r) for r in (0, 64, 16)]
    assert share[0] > share[1] > share[2] > 0  # SmolLM2 measured: 90% at 0, 67% at 64
    assert round(share[1], 2) == 0.75 and round(share[0], 2) == 0.90
    assert arithmetic_share(cfg, [1] * 30, 8192, 256, 8, 0, 64) == 0.0
    assert arithmetic_share(cfg, [3] * 30, 8192, 256, 8, 50, 64) == 0.0  # nothing merged


def test_disk_space_checked_before_writing(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(
        sequential.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000)
    )
    with pytest.raises(KVConvertError, match="not enough disk space"):
        kvconvert.convert(str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, **FAST)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("samples", [6, 2])  # 3 batches: uneven ranks; 1: rank 1 holds none
def test_two_gloo_ranks_equal_one_process(tiny_models, tmp_path, samples):
    """Statistics are summed over ranks and --refine-steps reads each step's batch on the
    rank that holds it, so the weights are those of one process."""
    src = str(tiny_models["qwen2"])
    n = str(samples)
    opts = ["--kv-heads", "2", "--num-samples", n, "--seq-len", "32", "--batch-size", "2"]
    one = kvconvert.convert(
        src, str(tmp_path / "one"), kv_heads=2, num_samples=samples, seq_len=32, batch_size=2,
        progress=False,
    )  # fmt: skip
    torchrun(["-m", "kvconvert", src, "-o", str(tmp_path / "two"), "-q", *opts])
    a, b = tensors(one), tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert load(tmp_path / "two").config.num_key_value_heads == 2
