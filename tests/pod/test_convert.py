"""``--target pod`` end to end on tiny models: API, CLI, report and errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import kvconvert
from kvconvert.cli import main
from kvconvert.evaluate import kv_cache_bytes
from tests.conftest import load, token_ids

POD = {"sink": 2, "recent": 8, "num_samples": 4, "seq_len": 32, "batch_size": 4, "progress": False}


def test_convert_with_saving_target(tiny_models, tmp_path):
    src = tiny_models["mistral"]  # 2 layers, 4 KV heads
    out = kvconvert.convert(str(src), str(tmp_path / "out"), target="pod", kv_saving=0.1, **POD)
    rep = json.loads((out / "kvconvert.json").read_text())
    tgt = rep["target"]
    # the saving is meant at the model's context (256), not at the calibration's 32 tokens
    assert tgt["kind"] == "pod" and tgt["context"] == 256
    assert tgt["predicted_kv_saving"] >= 0.1
    assert tgt["saving_at"] == {"256": pytest.approx(tgt["predicted_kv_saving"], abs=1e-6)}
    assert len(rep["similarity"]["matrix"]) == 1 and len(rep["similarity"]["matrix"][0]) == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pod_map"] == tgt["pod_map"] and cfg["auto_map"]["AutoModelForCausalLM"]
    assert (out / "modeling_kvconvert_pod.py").is_file()
    model, dense = load(out, trust_remote_code=True), load(src)
    ids = token_ids(1, 256)
    measured = 1 - kv_cache_bytes(model, ids) / kv_cache_bytes(dense, ids)
    assert measured == pytest.approx(tgt["predicted_kv_saving"], abs=1e-6)
    assert "Predicted KV cache saving at 256 tokens" in (out / "README.md").read_text()
    for name, t in load(src).state_dict().items():  # weights unchanged
        assert torch.equal(model.state_dict()[name], t), name


def test_cli_with_map_file(tiny_models, tmp_path):
    mapfile = tmp_path / "map.json"
    mapfile.write_text("[0, 0]")
    out = tmp_path / "out"
    args = [
        str(tiny_models["qwen2"]),
        "--target",
        "pod",
        "--pod-map",
        str(mapfile),
        "--sink",
        "2",
        "--recent",
        "4",
        "--context",
        "64",
        "-o",
        str(out),
        "-q",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "kvconvert.json").read_text())
    assert rep["target"]["pod_map"] == [[0] * 4, [0] * 4]
    assert rep["target"]["predicted_kv_saving"] == pytest.approx(0.5 * 0.5 * 58 / 64)
    assert rep["similarity"]["matrix"] is None
    assert "trust_remote_code=True" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"kv_saving": 0.6}, "kv_saving: must lie in"),
        ({"kv_heads": 2}, "kv_heads belongs to target='gqa'"),
        ({"recent": 40}, "no distant tokens"),
        ({"kv_saving": 0.45}, "cannot be reached"),
    ],
)
def test_clear_errors(tiny_models, tmp_path, opts, message):
    with pytest.raises(kvconvert.KVConvertError, match=message):
        kvconvert.convert(
            str(tiny_models["llama"]), str(tmp_path / "o"), target="pod", **{**POD, **opts}
        )
    assert not (tmp_path / "o").exists()


def test_gqa_then_pod(tiny_models, tmp_path):
    """--target gqa,pod: heads merged first (stock GQA weights), then the map on the merge."""
    src = tiny_models["llama"]  # 4 KV heads -> 2
    out = kvconvert.convert(
        str(src), str(tmp_path / "out"), target="gqa,pod", kv_heads=2, kv_saving=0.1, **POD
    )
    rep = json.loads((out / "kvconvert.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and len(cfg["pod_map"][0]) == 2
    assert rep["source"]["num_key_value_heads"] == 4
    assert rep["gqa"]["target"]["num_key_value_heads"] == 2
    assert rep["target"]["predicted_kv_saving"] >= 0.1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # stage removed
    gqa_only = kvconvert.convert(str(src), str(tmp_path / "gqa"), kv_heads=2, **POD)
    model, merged = load(out, trust_remote_code=True), load(gqa_only)
    ids = token_ids(1, rep["target"]["context"])
    saving = 1 - kv_cache_bytes(model, ids) / kv_cache_bytes(merged, ids)
    assert saving == pytest.approx(rep["target"]["predicted_kv_saving"], abs=1e-6)
    for name, t in merged.state_dict().items():  # the PoD weights are the merged ones
        assert torch.equal(model.state_dict()[name], t), name
    assert "merged first: 4 -> 2" in (out / "README.md").read_text()


def test_calibration_too_short_refused_before_loading(tiny_models, tmp_path, monkeypatch):
    """--target pod with the paper's recent window (4080) and the default calibration length
    (256) is refused before any model is loaded, naming the options to change."""
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    for target, extra in (("pod", {}), ("gqa,pod", {"kv_heads": 2})):
        with pytest.raises(
            kvconvert.KVConvertError, match="use seq_len above 4097 or a smaller recent"
        ):
            kvconvert.convert(
                str(tiny_models["llama"]), str(tmp_path / "o"), target=target, recent=4080, **extra
            )
    assert not (tmp_path / "o").exists()


def test_defaults_fit_together(tiny_models, tmp_path):
    """--target pod and gqa,pod with no PoD or calibration options convert: the recent window
    comes from the model's context (256 / 8 - sink 16 = 16) unless calibration is too short
    for it, and the report says which bound chose it."""
    src = tiny_models["llama"]
    for target, extra in (("pod", {}), ("gqa,pod", {"kv_heads": 2})):
        out = kvconvert.convert(
            str(src), str(tmp_path / target), target=target, progress=False, **extra
        )
        rep = json.loads((out / "kvconvert.json").read_text())["target"]
        assert rep["recent"] == 16 and "context 256 / 8" in rep["recent_from"]
        assert json.loads((out / "config.json").read_text())["pod_recent"] == 16
    # calibration shorter than the context's window: the calibration bound, and how to lift it
    out = kvconvert.convert(
        str(src), str(tmp_path / "short"), target="pod", seq_len=40, progress=False
    )
    rep = json.loads((out / "kvconvert.json").read_text())["target"]
    assert rep["recent"] == 40 // 2 - 16
    assert "--seq-len 40 / 2" in rep["recent_from"] and "--seq-len 64 or more" in rep["recent_from"]


def test_kv_saving_means_the_saving_at_the_models_context(tiny_models, tmp_path):
    """20% with sink 2 + recent 12 cannot be had at the 32 calibration tokens (at most 14%),
    but can at the model's 256 positions, which --context defaults to; the card states the
    saving at a few lengths."""
    src = tiny_models["mistral"]
    opts = {**POD, "recent": 12, "kv_saving": 0.2}
    with pytest.raises(kvconvert.KVConvertError, match=r"cannot be reached at 32 tokens"):
        kvconvert.convert(str(src), str(tmp_path / "short"), target="pod", context=32, **opts)
    assert not (tmp_path / "short").exists()
    out = kvconvert.convert(str(src), str(tmp_path / "out"), target="pod", **opts)
    tgt = json.loads((out / "kvconvert.json").read_text())["target"]
    assert tgt["context"] == 256 and tgt["predicted_kv_saving"] >= 0.2
    ids = token_ids(1, 256)
    dense = kv_cache_bytes(load(src), ids)
    measured = 1 - kv_cache_bytes(load(out, trust_remote_code=True), ids) / dense
    assert measured == pytest.approx(tgt["predicted_kv_saving"], abs=1e-6)
