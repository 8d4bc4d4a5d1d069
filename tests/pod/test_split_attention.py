"""The PoD model code's split attention: distant and proximal parts merged by log-sum-exp,
in query chunks, reading the block bottom's keys in place.

Chunks are made small here (the module's ``CHUNK``, and ``PREFILL``: a longer prompt runs
through the model in pieces) so that every path runs on tiny models:
the aligned path (no padding) with its full distant block, band and proximal parts, the
per-row masked path (padding, shifted positions), the switch between them, and the public
math fallback where torch's fused operator is absent or gradients are needed.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from kvconvert.compat import cache_bytes
from kvconvert.evaluate import kv_cache_bytes
from kvconvert.pod.layermap import predicted_saving
from tests.conftest import FAMILIES, load, token_ids
from tests.pod.reference import reference_logits
from tests.pod.test_modeling import RECENT, SINK, biased, decode_logits, dims, make_pod, shared_map


@contextlib.contextmanager
def patched(model, **values):
    """Set module-level constants of the model's own (remote) code for a while: those of its
    PoD core (``modeling_kvconvert_pod.py``), where the mixin's forward is."""
    module = sys.modules[type(model).forward.__module__]
    before = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield module
    finally:
        for k, v in before.items():
            setattr(module, k, v)


SMALL = {"CHUNK": 5, "MATH_SCORES": 256, "PREFILL": 13}


@pytest.fixture
def biased_pod(tiny_models, tmp_path):
    def make(family: str, impl: str):
        src = tiny_models[family]
        pod_map = shared_map(*dims(src))
        bias = biased(pod_map, -1.5)
        out = make_pod(src, tmp_path / f"{family}-{impl}", pod_map, distant_bias=bias)
        pod = load(out, trust_remote_code=True, attn_implementation=impl)
        return src, pod, pod_map, bias

    return make


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_continuation_equal_reference(biased_pod, family, impl):
    src, pod, pod_map, bias = biased_pod(family, impl)
    ids = token_ids(2, 40)
    want = reference_logits(load(src), ids, pod_map, SINK, RECENT, bias)
    with patched(pod, **SMALL), torch.inference_mode():
        assert (pod(input_ids=ids).logits - want).abs().max() < 1e-5
        # a second forward of many tokens onto a filled cache (chunked, past > 0)
        first = pod(input_ids=ids[:, :9], use_cache=True)
        rest = pod(input_ids=ids[:, 9:], past_key_values=first.past_key_values, use_cache=True)
        got = torch.cat([first.logits, rest.logits], dim=1)
        assert (got - want).abs().max() < 1e-5
    with patched(pod, **SMALL):
        assert (decode_logits(pod, ids, 11) - want).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_in_pieces_keeps_the_logits_asked_for(biased_pod, family, impl):
    """A prompt longer than ``PREFILL`` runs in pieces: the logits ``logits_to_keep`` asks for
    (all, the last few, the last one, more than a piece) are the one-piece forward's, and the
    cache holds every token's keys once, ready to decode."""
    src, pod, pod_map, bias = biased_pod(family, impl)
    ids = token_ids(2, 40)
    with torch.inference_mode():
        whole = pod(input_ids=ids, use_cache=True)  # 40 < PREFILL: one piece
        for keep in (0, 1, 3, 20):
            with patched(pod, **SMALL):
                out = pod(input_ids=ids, use_cache=True, logits_to_keep=keep)
            want = whole.logits if keep == 0 else whole.logits[:, -keep:]
            assert out.logits.shape == want.shape
            assert (out.logits - want).abs().max() < 1e-5
        assert out.past_key_values.get_seq_length() == 40
        assert out.past_key_values.prefill_total == 0
        assert cache_bytes(out.past_key_values) == cache_bytes(whole.past_key_values)
        # in pieces onto a filled cache, the padding mask over new tokens only or over all
        for cover in (31, 40):
            first = pod(input_ids=ids[:, :9], use_cache=True)
            with patched(pod, **SMALL):
                rest = pod(
                    input_ids=ids[:, 9:],
                    attention_mask=torch.ones(2, cover, dtype=torch.long),
                    past_key_values=first.past_key_values,
                    use_cache=True,
                )
            assert (rest.logits - whole.logits[:, 9:]).abs().max() < 1e-5
            # room for every piece made once, not grown piece by piece
            assert cache_bytes(rest.past_key_values) == cache_bytes(whole.past_key_values)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padded_rows_equal_each_row_alone(biased_pod, impl):
    """Left padding takes the per-row masked path; each row's logits are its own alone."""
    _, pod, _, _ = biased_pod("llama", impl)
    a, b = token_ids(1, 30, seed=1)[0], token_ids(1, 19, seed=2)[0]
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 11:], mask[1, 11:] = b, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with patched(pod, **SMALL), torch.inference_mode():
        got = pod(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        alone_a = pod(input_ids=a[None]).logits
        alone_b = pod(input_ids=b[None]).logits
    assert (got[0] - alone_a[0]).abs().max() < 1e-5
    assert (got[1, 11:] - alone_b[0]).abs().max() < 1e-5


@torch.inference_mode()
def test_switch_from_aligned_to_masked_bookkeeping(biased_pod):
    """A cache filled without padding, then given shifted positions, matches a run that
    kept per-row bookkeeping from the start."""
    _, pod, _, _ = biased_pod("mistral", "sdpa")
    ids = token_ids(2, 30)
    shifted = torch.arange(15, 33)[None].expand(2, -1)
    with patched(pod, **SMALL):
        first = pod(input_ids=ids[:, :12], use_cache=True)
        assert first.past_key_values.aligned
        rest = pod(
            input_ids=ids[:, 12:],
            position_ids=shifted,
            past_key_values=first.past_key_values,
            use_cache=True,
        )
        assert not rest.past_key_values.aligned
        pos = torch.cat([torch.arange(12)[None].expand(2, -1), shifted], dim=1)
        whole = pod(input_ids=ids, position_ids=pos).logits
    assert (rest.logits - whole[:, 12:]).abs().max() < 1e-5


def test_public_math_path_is_exact_and_trains(biased_pod):
    """Without torch's fused CPU operator (absent on some builds and devices) and with
    gradients (its log-sum-exp has none) the public math path gives the same logits."""
    src, pod, pod_map, bias = biased_pod("mistral", "sdpa")
    ids = token_ids(2, 40)
    want = reference_logits(load(src), ids, pod_map, SINK, RECENT, bias)
    with patched(pod, CPU_FLASH=None, **SMALL), torch.inference_mode():
        assert (pod(input_ids=ids).logits - want).abs().max() < 1e-5
    pod.train()
    with patched(pod, **SMALL):
        out = pod(input_ids=ids, labels=ids)
    assert (out.logits.detach() - want).abs().max() < 1e-5
    out.loss.backward()
    k = pod.model.layers[0].self_attn.k_proj.weight.grad  # layer 1 reads layer 0's keys
    assert k is not None and torch.isfinite(k).all() and k.abs().sum() > 0


def test_gradient_checkpointing_is_refused_with_reason(biased_pod):
    _, pod, _, _ = biased_pod("llama", "sdpa")
    pod.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pod.train()
    with pytest.raises(ValueError, match="gradient checkpointing drops the cache"):
        pod(input_ids=token_ids(1, 12), labels=token_ids(1, 12))


class LargestResult(torch.overrides.TorchFunctionMode):
    """Records the shape of every tensor a torch function returns (not broadcast views,
    which hold one element for many)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and 0 not in t.stride():
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_long_prefill_builds_nothing_quadratic_and_holds_the_formula(
    tiny_models, tmp_path, impl, padded
):
    """At a few thousand tokens: no tensor spans (queries x keys) of the prefill, and every
    tensor reachable from the returned cache sums to the formula's KV bytes (no masks, no
    copies kept); with a padding mask (the per-row masked path) too."""
    src = tiny_models["llama"]
    L, kv = dims(src)
    pod_map = [[0] * kv, [0, 0, 1, 1]]
    pod = load(make_pod(src, tmp_path / "pod", pod_map), trust_remote_code=True)
    pod.set_attn_implementation(impl)
    length = 2500
    ids = token_ids(1, length)
    mask = torch.ones_like(ids)
    if padded:
        mask[:, :3] = 0  # left padding: positions still count from the first slot here
    watch = LargestResult()
    with patched(pod, CHUNK=64), torch.inference_mode(), watch:
        out = pod(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    assert out.past_key_values.aligned is not padded
    wide = [s for s in watch.shapes if sum(d >= length // 2 for d in s) >= 2]
    assert not wide, f"(queries x keys)-sized tensors built: {wide[:3]}"
    dense = kv_cache_bytes(load(src), ids)
    saving = predicted_saving(pod_map, SINK, RECENT, length)
    formula = round(dense * (1 - saving))
    held = cache_bytes(out.past_key_values)
    if padded:  # per-row bookkeeping: each slot's position (int64) and validity (bool)
        assert abs(held - (formula + 9 * length)) <= 0.01 * formula
    else:
        assert held == formula


@torch.inference_mode()
def test_long_decoding_equals_the_uncached_forward(tiny_models, tmp_path):
    """Decoding after a long prefill, on two threads: single-head distant parts are cut into
    pieces that run in parallel; the cache grows into spare room (about 1%), not by copying
    every earlier token per step; the logits equal a forward over the whole sequence."""
    src = tiny_models["llama"]
    _, kv = dims(src)
    pod_map = [[0] * kv, [0, 1, 0, 1]]  # runs of one head each
    pod = load(make_pod(src, tmp_path / "pod", pod_map), trust_remote_code=True)
    ids = token_ids(1, 1600)
    torch.set_num_threads(2)
    with patched(pod, PIECE=512):
        cache = pod(input_ids=ids[:, :1590], use_cache=True).past_key_values
        steps = []
        for t in range(1590, 1600):
            out = pod(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    want = pod(input_ids=ids).logits[:, 1590:]
    assert (torch.cat(steps, dim=1) - want).abs().max() < 1e-5
    held = cache_bytes(cache)
    dense = kv_cache_bytes(load(src), ids)
    formula = round(dense * (1 - predicted_saving(pod_map, SINK, RECENT, 1600)))
    assert formula <= held <= 1.01 * formula  # spare room of at most about 1%


def test_decoding_outside_inference_mode_after_an_inference_mode_prefill(biased_pod):
    """A prefill under torch.inference_mode and decoding under no_grad (as generate() does)."""
    _, pod, _, _ = biased_pod("llama", "sdpa")
    ids = token_ids(2, 30)
    with torch.inference_mode():
        want = pod(input_ids=ids).logits
        cache = pod(input_ids=ids[:, :20], use_cache=True).past_key_values
    with torch.no_grad():
        for t in range(20, 30):
            out = pod(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            assert (out.logits[:, 0] - want[:, t]).abs().max() < 1e-5


def test_cache_bytes_count_what_a_cache_object_keeps():
    """A cache that keeps a mask or a copy beside its layers is charged for it."""

    class Layer:
        def __init__(self):
            self.keys = torch.zeros(1, 2, 10, 4)
            self.values = torch.zeros(1, 2, 10, 4)

    class Cache:
        def __init__(self):
            self.layers = [Layer()]
            self.step = torch.tensor(3)  # a 0-dim counter: not storage

    cache = Cache()
    assert cache_bytes(cache) == 2 * 80 * 4
    cache._masks = {None: (torch.ones(10, 10, dtype=torch.bool),)}
    assert cache_bytes(cache) == 2 * 80 * 4 + 100
