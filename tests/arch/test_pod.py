"""--target pod on phi3 / qwen3 / gemma / gemma2 (stock classes with PoD attention): the
identity map reproduces the stock logits, a real map loads, generates with the cache, decodes as
it prefills, and its measured cache equals the saving formula (sliding layers: stock window)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvconvert
from kvconvert.evaluate import kv_cache_bytes
from kvconvert.pod.layermap import predicted_saving
from tests.conftest import load, token_ids
from tests.models import ARCHS, gemma2_4layer
from tests.pod.test_modeling import biased, decode_logits, make_pod
from tests.pod.test_split_attention import SMALL, patched

SINK, RECENT = 2, 4
POD = {"sink": SINK, "recent": RECENT, "seq_len": 32, "num_samples": 4, "progress": False}


def impls(arch: str) -> list[str]:
    return ["eager"] if arch == "gemma2" else ["eager", "sdpa"]  # stock gemma2 refuses sdpa


@pytest.fixture(scope="module")
def gemma2_4(tmp_path_factory) -> Path:
    return gemma2_4layer(tmp_path_factory.mktemp("gemma2_4") / "m")


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_map_equals_stock(arch_models, tmp_path, arch):
    src = arch_models[arch]
    cfg = json.loads((src / "config.json").read_text())
    L, kv = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    out = make_pod(src, tmp_path / "pod", [[i] * kv for i in range(L)])
    check_identity(src, out, impls(arch))


def check_identity(src, out, impls: list[str]) -> None:
    """An identity-map PoD output is the stock model's PoD class, and its prefill and its
    token-by-token decoding both give the stock logits, with each attention implementation."""
    ids = token_ids(2, 24)  # longer than gemma2's window (8)
    for impl in impls:
        pod = load(out, trust_remote_code=True, attn_implementation=impl)
        assert type(pod).__name__ == f"KVConvertPod{type(load(src)).__name__}"
        with torch.inference_mode():
            want = load(src, attn_implementation=impl)(input_ids=ids).logits
            assert (pod(input_ids=ids).logits - want).abs().max() < 1e-5
            with patched(pod, **SMALL):  # a prefill in chunks of 5 queries
                assert (pod(input_ids=ids).logits - want).abs().max() < 1e-5
        assert (decode_logits(pod, ids, 5) - want).abs().max() < 1e-5


def check_real_map(src, out, pod_map, windows=None) -> None:
    pod, stock = load(out, trust_remote_code=True), load(src)
    ids = token_ids(2, 24)
    with torch.inference_mode():
        prefill = pod(input_ids=ids).logits
        assert (prefill - stock(input_ids=ids).logits).abs().max() > 1e-3  # really shares
    assert (decode_logits(pod, ids, 3) - prefill).abs().max() < 1e-5  # across the window
    gen = pod.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 30)
    for length in (5, 24, 40):
        ids = token_ids(2, length)
        saving = predicted_saving(pod_map, SINK, RECENT, length, windows)
        assert kv_cache_bytes(pod, ids) == round(kv_cache_bytes(stock, ids) * (1 - saving))
    assert predicted_saving(pod_map, SINK, RECENT, 40, windows) > 0


def check_distant_bias(out, impls: list[str]) -> None:
    """A bias written into a real map's config changes the logits, and the biased model
    decodes as it prefills, with each attention implementation alike."""
    config = json.loads((out / "config.json").read_text())
    plain = load(out, trust_remote_code=True)
    config["pod_distant_bias"] = biased(config["pod_map"], -1.5)
    (out / "config.json").write_text(json.dumps(config))
    ids = token_ids(2, 24)
    logits = []
    for impl in impls:
        pod = load(out, trust_remote_code=True, attn_implementation=impl)
        with torch.inference_mode():
            logits.append(pod(input_ids=ids).logits)
            with patched(pod, **SMALL):  # a prefill in chunks of 5 queries
                assert (pod(input_ids=ids).logits - logits[-1]).abs().max() < 1e-5
        assert (decode_logits(pod, ids, 3) - logits[-1]).abs().max() < 1e-5
    with torch.inference_mode():
        assert (plain(input_ids=ids).logits - logits[0]).abs().max() > 1e-3
    assert all((x - logits[0]).abs().max() < 1e-5 for x in logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_distant_bias(arch_models, gemma2_4, tmp_path, arch):
    """gemma2: layer 3 borrows layer 1's keys over the sliding layer 2 (soft-capped logits)."""
    src = gemma2_4 if arch == "gemma2" else arch_models[arch]
    mapfile = tmp_path / "map.json"
    mapfile.write_text("[0, 1, 2, 1]" if arch == "gemma2" else "[0, 0]")
    out = kvconvert.convert(
        str(src), str(tmp_path / "o"), target="pod", pod_map=str(mapfile), **POD
    )
    check_distant_bias(out, impls(arch))


@pytest.mark.parametrize("arch", ["phi3", "qwen3", "gemma"])
def test_blocks_of_two_save_keys(arch_models, tmp_path, arch):
    src = arch_models[arch]
    mapfile = tmp_path / "map.json"
    mapfile.write_text("[0, 0]")  # layer 1 reads distant tokens through layer 0's keys
    out = kvconvert.convert(
        str(src), str(tmp_path / "o"), target="pod", pod_map=str(mapfile), **POD
    )
    rep = json.loads((out / "kvconvert.json").read_text())
    kv = load(src).config.num_key_value_heads
    assert rep["target"]["pod_map"] == [[0] * kv, [0] * kv]
    check_real_map(src, out, rep["target"]["pod_map"])


def test_gemma2_block_skips_sliding_layer(gemma2_4, tmp_path):
    """Calibrated: layers 1 and 3 may share (layer 2 slides between them), 0 and 2 never."""
    out = kvconvert.convert(str(gemma2_4), str(tmp_path / "o"), target="pod", kv_saving=0.1, **POD)
    rep = json.loads((out / "kvconvert.json").read_text())
    sim = rep["similarity"]["matrix"]
    assert sim[0] == [None, None] and sim[1] == [None, None]  # layers 1 and 2 join nothing
    assert all(0 < x <= 1 for x in sim[2])  # layer 3 vs layer 1
    pod_map = rep["target"]["pod_map"]
    assert [row for i, row in enumerate(pod_map) if i != 3] == [[0, 0], [1, 1], [2, 2]]
    assert 1 in pod_map[3]
    windows = [8, None, 8, None]
    assert rep["target"]["context"] == 256  # the model's maximum context
    assert rep["target"]["predicted_kv_saving"] == pytest.approx(
        predicted_saving(pod_map, SINK, RECENT, 256, windows)
    )
    check_real_map(gemma2_4, out, pod_map, windows)
    bad = tmp_path / "bad.json"
    bad.write_text("[0, 0, 0, 0]")
    with pytest.raises(kvconvert.KVConvertError, match="sliding-window layers"):
        kvconvert.convert(str(gemma2_4), str(tmp_path / "b"), target="pod", pod_map=str(bad), **POD)


def test_qwen3_calibrated_and_gqa_then_pod(arch_models, tmp_path):
    src = arch_models["qwen3"]  # 4 KV heads -> 2, then a saving target on the merged model
    out = kvconvert.convert(
        str(src), str(tmp_path / "o"), target="gqa,pod", kv_heads=2, kv_saving=0.1, **POD
    )
    rep = json.loads((out / "kvconvert.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["model_type"] == "kvconvert_pod_qwen3"
    assert rep["target"]["predicted_kv_saving"] >= 0.1
    pod = load(out, trust_remote_code=True)
    gen = pod.generate(token_ids(1, 8), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 12)
