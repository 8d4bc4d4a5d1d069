"""The PoD remote code: exact at the identity map, equal to a dense reference when sharing,
prefill = cached decode across the recent-window boundary, and a cache that holds fewer keys."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kvconvert.arch import get_adapter
from kvconvert.evaluate import kv_cache_bytes
from kvconvert.pod.checkpoint import copy_modeling_files, pod_config
from kvconvert.pod.layermap import predicted_saving
from tests.conftest import FAMILIES, load, token_ids
from tests.pod.reference import reference_logits

SINK, RECENT = 2, 4


def make_pod(
    src: Path, dst: Path, pod_map, sink: int = SINK, recent: int = RECENT, distant_bias=None
) -> Path:
    """A PoD checkpoint of ``src`` with ``pod_map`` (weights copied unchanged)."""
    cfg = json.loads((src / "config.json").read_text())
    names = set(safe_open(str(src / "model.safetensors"), "pt").keys())
    dst.mkdir(parents=True)
    shutil.copy(src / "model.safetensors", dst)
    adapter = get_adapter(cfg["model_type"])
    conf = pod_config(cfg, src, adapter, names, pod_map, sink, recent, False, distant_bias)
    (dst / "config.json").write_text(json.dumps(conf))
    copy_modeling_files(dst)
    return dst


def shared_map(num_layers: int, kv: int) -> list[list[int]]:
    """Layer 1 borrows layer 0's keys for half of its heads (mixed layer); no other sharing."""
    rows = [[i] * kv for i in range(num_layers)]
    rows[1] = [0] * (kv // 2) + [1] * (kv - kv // 2)
    return rows


def dims(src: Path) -> tuple[int, int]:
    cfg = json.loads((src / "config.json").read_text())
    return cfg["num_hidden_layers"], cfg["num_key_value_heads"]


@torch.inference_mode()
def decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position: a prefill of ``prefill`` tokens, then one token at a time."""
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_map_equals_stock(tiny_models, tmp_path, family, impl):
    src = tiny_models[family]
    L, kv = dims(src)
    pod = load(
        make_pod(src, tmp_path / "pod", [[i] * kv for i in range(L)]),
        trust_remote_code=True,
        attn_implementation=impl,
    )
    stock = load(src, attn_implementation=impl)
    ids = token_ids(2, 24)
    with torch.inference_mode():
        want = stock(input_ids=ids).logits
        assert (pod(input_ids=ids).logits - want).abs().max() < 1e-5
    assert (decode_logits(pod, ids, 5) - want).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_map_equals_dense_reference(tiny_models, tmp_path, family, impl):
    src = tiny_models[family]
    pod_map = shared_map(*dims(src))
    pod = load(
        make_pod(src, tmp_path / "pod", pod_map), trust_remote_code=True, attn_implementation=impl
    )
    ids = token_ids(2, 24)
    want = reference_logits(load(src), ids, pod_map, SINK, RECENT)
    with torch.inference_mode():
        got = pod(input_ids=ids).logits
        dense = load(src)(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (dense - want).abs().max() > 1e-2  # sharing really changes the model
    # decoding one token at a time from a prefill shorter than sink + recent, so tokens
    # leave the recent window while decoding
    assert (decode_logits(pod, ids, 3) - want).abs().max() < 1e-5


def biased(pod_map: list[list[int]], value: float) -> list[list[float]]:
    """``value`` on every borrowing head, a different one per head (0 where it owns its keys)."""
    return [
        [0.0 if b == layer else value * (1 + h) for h, b in enumerate(row)]
        for layer, row in enumerate(pod_map)
    ]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_distant_bias_equals_dense_reference(tiny_models, tmp_path, family, impl):
    src = tiny_models[family]
    pod_map = shared_map(*dims(src))
    bias = biased(pod_map, -1.5)
    pod = load(
        make_pod(src, tmp_path / "pod", pod_map, distant_bias=bias),
        trust_remote_code=True,
        attn_implementation=impl,
    )
    ids = token_ids(2, 24)
    want = reference_logits(load(src), ids, pod_map, SINK, RECENT, bias)
    unbiased = reference_logits(load(src), ids, pod_map, SINK, RECENT)
    with torch.inference_mode():
        got = pod(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (unbiased - want).abs().max() > 1e-2  # the bias really changes the model
    assert (decode_logits(pod, ids, 3) - want).abs().max() < 1e-5


@torch.inference_mode()
def test_zero_distant_bias_is_plain_pod_and_generates(tiny_models, tmp_path):
    src = tiny_models["llama"]
    pod_map = shared_map(*dims(src))
    plain = load(make_pod(src, tmp_path / "plain", pod_map), trust_remote_code=True)
    zero = load(
        make_pod(src, tmp_path / "zero", pod_map, distant_bias=biased(pod_map, 0.0)),
        trust_remote_code=True,
    )
    ids = token_ids(2, 20)
    assert torch.equal(zero(input_ids=ids).logits, plain(input_ids=ids).logits)
    pod = load(
        make_pod(src, tmp_path / "bias", pod_map, distant_bias=biased(pod_map, -2.0)),
        trust_remote_code=True,
    )
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = pod.generate(input_ids=ids, **kw)
    assert torch.equal(pod.generate(input_ids=ids, use_cache=False, **kw), cached)
    assert not torch.equal(plain.generate(input_ids=ids, **kw), cached)


def test_distant_bias_refused_on_own_keys(tiny_models, tmp_path):
    src = tiny_models["llama"]
    pod_map = shared_map(*dims(src))
    bias = biased(pod_map, -1.0)
    bias[0][0] = -1.0  # layer 0 owns its keys
    with pytest.raises(ValueError, match=r"pod_distant_bias\[0\]\[0\] = -1.0: layer 0 keeps"):
        load(make_pod(src, tmp_path / "pod", pod_map, distant_bias=bias), trust_remote_code=True)


def test_cache_bytes_match_formula(tiny_models, tmp_path):
    src = tiny_models["mistral"]
    L, kv = dims(src)
    pod_map = [[0] * kv, [0, 0, 1, 1]]  # B = 4 + 2 (head, block) pairs out of 8
    pod = load(make_pod(src, tmp_path / "pod", pod_map), trust_remote_code=True)
    dense = load(src)
    for length in (7, 24, 40):
        ids = token_ids(3, length)
        full = kv_cache_bytes(dense, ids)
        saving = predicted_saving(pod_map, SINK, RECENT, length)
        assert saving > 0
        assert kv_cache_bytes(pod, ids) == round(full * (1 - saving))
        # the real objects: the upper layer holds sink + recent keys for its borrowing heads
        cache = pod(input_ids=ids, use_cache=True).past_key_values
        assert cache.layers[1].window_keys.shape[2] == SINK + RECENT
        assert cache.layers[1].keys.shape[2] == length
        assert cache.layers[1].values.shape[2] == length


@torch.inference_mode()
def test_padded_batch_and_generate(tiny_models, tmp_path):
    src = tiny_models["llama"]
    pod_map = shared_map(*dims(src))
    pod = load(make_pod(src, tmp_path / "pod", pod_map), trust_remote_code=True)
    a, b = token_ids(1, 16, seed=1)[0], token_ids(1, 11, seed=2)[0]
    ids = torch.full((2, 16), 0)
    mask = torch.zeros(2, 16, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 5:], mask[1, 5:] = b, 1  # left padding
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    batched = pod.generate(input_ids=ids, attention_mask=mask, **kw)
    alone_a = pod.generate(input_ids=a[None], **kw)
    alone_b = pod.generate(input_ids=b[None], **kw)
    assert torch.equal(batched[0, 16:], alone_a[0, 16:])
    assert torch.equal(batched[1, 16:], alone_b[0, 11:])
    no_cache = pod.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(no_cache, batched)
    # padded prefill logits equal unpadded ones for the real tokens
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = pod(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (padded[1, 5:] - pod(input_ids=b[None]).logits[0]).abs().max() < 1e-5


def test_loads_without_kvconvert(tiny_models, tmp_path):
    """The output is self-contained remote code: loading it never imports kvconvert."""
    src = tiny_models["qwen2"]
    out = make_pod(src, tmp_path / "pod", shared_map(*dims(src)))
    code = (
        "import sys; sys.modules['kvconvert'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "print(type(m).__name__, m.generate(max_new_tokens=3, do_sample=False).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "KVConvertPodForCausalLM" in res.stdout
