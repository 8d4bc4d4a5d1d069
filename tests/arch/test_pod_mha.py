"""--target pod on the MHA-only architectures gpt_neox (fused per-head qkv, partial rotary,
parallel residual) and opt (learned positions with offset 2, biases, no RoPE): stock classes
with PoD attention, as tests/arch/test_pod.py does for phi3/qwen3/gemma/gemma2, plus the
positions of a left-padded batch (OPT derives them from the padding mask) and the refusal of
``gqa,pod`` (their GQA and PoD outputs are different modeling code; not combined yet)."""

from __future__ import annotations

import json

import pytest
import torch

import kvconvert
from kvconvert.errors import KVConvertError
from tests.arch.test_pod import POD, check_distant_bias, check_identity, check_real_map
from tests.conftest import load, token_ids
from tests.models import POD_MHA_ARCHS


def convert_with_map(src, dst, layers: list[int], tmp_path):
    mapfile = tmp_path / "map.json"
    mapfile.write_text(json.dumps(layers))
    return kvconvert.convert(str(src), str(dst), target="pod", pod_map=str(mapfile), **POD)


@pytest.mark.parametrize("arch", POD_MHA_ARCHS)
def test_identity_map_equals_stock(remote_arch_models, tmp_path, arch):
    """Through ``convert`` (GPT-NeoX's ``embed_out`` is stored as the ``lm_head`` it loads as)."""
    src = remote_arch_models[arch]
    out = convert_with_map(src, tmp_path / "pod", [0, 1], tmp_path)
    check_identity(src, out, ["eager", "sdpa"])


@pytest.mark.parametrize("arch", POD_MHA_ARCHS)
def test_blocks_of_two_save_keys(remote_arch_models, tmp_path, arch):
    src = remote_arch_models[arch]
    out = convert_with_map(src, tmp_path / "o", [0, 0], tmp_path)
    rep = json.loads((out / "kvconvert.json").read_text())
    assert rep["target"]["pod_map"] == [[0] * 4, [0] * 4]
    check_real_map(src, out, rep["target"]["pod_map"])


@pytest.mark.parametrize("arch", POD_MHA_ARCHS)
def test_distant_bias(remote_arch_models, tmp_path, arch):
    out = convert_with_map(remote_arch_models[arch], tmp_path / "o", [0, 0], tmp_path)
    check_distant_bias(out, ["eager", "sdpa"])


@pytest.mark.parametrize("arch", POD_MHA_ARCHS)
def test_left_padded_batch_matches_stock(remote_arch_models, tmp_path, arch):
    """A padding mask without position ids: the stock rule gives the positions (OPT counts
    real tokens, so left padding shifts them), in a forward and in greedy generation."""
    src = remote_arch_models[arch]
    pod = load(convert_with_map(src, tmp_path / "pod", [0, 1], tmp_path), trust_remote_code=True)
    stock = load(src)
    ids = token_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.inference_mode():
        got = pod(input_ids=ids, attention_mask=mask).logits
        want = stock(input_ids=ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() < 1e-5
    gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(pod.generate(ids, **gen), stock.generate(ids, **gen))


def test_calibrated_map_and_gqa_pod_refused(remote_arch_models, tmp_path):
    src = remote_arch_models["opt"]
    out = kvconvert.convert(str(src), str(tmp_path / "o"), target="pod", kv_saving=0.1, **POD)
    rep = json.loads((out / "kvconvert.json").read_text())
    assert all(0 < x <= 1 for x in rep["similarity"]["matrix"][0])
    assert rep["target"]["predicted_kv_saving"] >= 0.1
    check_real_map(src, out, rep["target"]["pod_map"])
    for arch in POD_MHA_ARCHS:
        dst = tmp_path / f"{arch}-gqa-pod"
        with pytest.raises(KVConvertError, match=r"target='gqa,pod' is not available.*gqa, pod\)"):
            kvconvert.convert(
                str(remote_arch_models[arch]), str(dst), target="gqa,pod", kv_heads=2, **POD
            )
        assert not dst.exists()
