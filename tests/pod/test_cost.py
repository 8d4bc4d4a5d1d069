"""Borrowing cost (``--map-by cost``): what it measures, and the map it picks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kvconvert
from kvconvert.arch import get_adapter
from kvconvert.errors import KVConvertError
from kvconvert.pod.cost import borrow_cost
from kvconvert.pod.layermap import blocks_by_cost, predicted_saving
from tests.conftest import load, token_ids

SINK, RECENT, T = 2, 8, 40


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> str:
    """4 layers, 4 query heads over 2 KV heads: blocks of up to 4 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    folder = tmp_path_factory.mktemp("deep") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def _outputs(model, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s attention output (after o_proj) and its input residual stream."""
    got = {}
    attn = model.model.layers[layer].self_attn
    h1 = attn.o_proj.register_forward_hook(lambda m, a, out: got.__setitem__("o", out))
    h2 = model.model.layers[layer].register_forward_pre_hook(
        lambda m, a, kw: got.__setitem__("r", kw.get("hidden_states", a[0] if a else None)),
        with_kwargs=True,
    )
    with torch.inference_mode():
        model(input_ids=ids)
    h1.remove(), h2.remove()
    return got["o"], got["r"]


@pytest.mark.parametrize(
    ("layer", "head", "depth", "bias"),
    [(2, 1, 1, 0.0), (3, 0, 1, 0.0), (1, 0, 1, 0.0), (2, 1, 1, -2.0)],
)
def test_cost_is_the_error_the_pod_model_makes(deep_llama, tmp_path, layer, head, depth, bias):
    """cost[l, h, 0] equals the residual error the written PoD model's layer l makes when only
    head h borrows, from layer l - 1 (float32 rounding apart), with its distant bias. Deeper
    bottoms run the same code with another layer's keys; a block of several upper layers
    compounds, so no single layer of a written model shows their cost alone."""
    ids = token_ids(n=3, length=T, seed=3)
    original = load(deep_llama)
    config = json.loads((Path(deep_llama) / "config.json").read_text())
    cost, chosen, similarity = borrow_cost(
        original,
        get_adapter("llama"),
        config,
        ids,
        SINK,
        RECENT,
        2,
        depth=3,
        progress=False,
        biases=(bias,),
    )
    assert cost.shape == (4, 2, 3) and similarity.shape == (3, 2)
    assert np.isnan(cost[1, :, 1:]).all() and np.isfinite(cost[3]).all()
    assert (chosen == bias).all()

    rows = [[i, i] for i in range(4)]
    for upper in range(layer - depth + 1, layer + 1):
        rows[upper][head] = layer - depth
    (tmp_path / "map.json").write_text(json.dumps(rows))
    out = kvconvert.convert(
        deep_llama,
        str(tmp_path / "pod"),
        target="pod",
        pod_map=str(tmp_path / "map.json"),
        sink=SINK,
        recent=RECENT,
        seq_len=T,
        progress=False,
    )
    if bias:  # the --pod-map path writes no bias: add the one measured
        written = json.loads((out / "config.json").read_text())
        written["pod_distant_bias"] = [
            [bias if b != i else 0.0 for b in row] for i, row in enumerate(rows)
        ]
        (out / "config.json").write_text(json.dumps(written))
    pod = load(out, trust_remote_code=True)
    o_orig, resid = _outputs(original, layer, ids)
    o_pod, _ = _outputs(pod, layer, ids)
    q = torch.arange(T)
    has = q - RECENT - 1 >= SINK  # queries that see a distant token
    err = (o_pod - o_orig).pow(2).sum(-1) / resid.pow(2).sum(-1)
    expected = float(err[:, has].mean(-1).mean())
    assert expected > 1e-4  # borrowing really changes this layer
    assert cost[layer, head, depth - 1] == pytest.approx(expected, rel=1e-3)


def test_bias_grid_keeps_the_cheapest(deep_llama):
    """With a grid, each entry is the least of the grid's costs, and names the bias that gave it."""
    ids = token_ids(n=3, length=T, seed=3)
    original = load(deep_llama)
    config = json.loads((Path(deep_llama) / "config.json").read_text())
    run = dict(depth=2, progress=False)
    args = (original, get_adapter("llama"), config, ids, SINK, RECENT, 3)
    grid = (0.0, -1.0, -4.0)
    each = [borrow_cost(*args, biases=(b,), **run)[0] for b in grid]
    cost, chosen, _ = borrow_cost(*args, biases=grid, **run)
    ok = np.isfinite(cost)
    stacked = np.stack(each, -1)[ok]  # (entries, grid)
    assert np.allclose(cost[ok], stacked.min(-1), rtol=1e-6)
    assert np.array_equal(chosen[ok], np.asarray(grid)[stacked.argmin(-1)])
    assert len(set(chosen[ok].tolist())) > 1  # this model's heads do not all pick one bias


def _brute_force(cost, target, max_block=None, keep_first=0):
    L, kv, _ = cost.shape
    best = None
    for bits in itertools.product([0, 1], repeat=(L - 1) * kv):
        rows = [[i] * kv for i in range(L)]
        for i, b in enumerate(bits):
            layer, h = 1 + i // kv, i % kv
            if b:
                if layer < keep_first:
                    break
                rows[layer][h] = rows[layer - 1][h]
        else:
            sizes = [[r[h] for r in rows].count(b) for h in range(kv) for b in range(L)]
            if max_block and max(sizes) > max_block:
                continue
            if predicted_saving(rows, 0, 0, 100) < target:
                continue
            total = sum(
                cost[i, h, i - rows[i][h] - 1]
                for i in range(L)
                for h in range(kv)
                if rows[i][h] != i
            )
            if best is None or total < best:
                best = total
    return best


@pytest.mark.parametrize(
    ("target", "max_block", "keep_first"), [(0.1, None, 0), (0.2, 3, 0), (0.15, None, 2)]
)
def test_least_cost_map_is_optimal(target, max_block, keep_first):
    rng = np.random.default_rng(0)
    cost = rng.random((6, 2, 5))
    for layer in range(6):
        cost[layer, :, layer:] = np.nan
    rows = blocks_by_cost(cost, target, 0, 0, 100, max_block, keep_first)
    assert predicted_saving(rows, 0, 0, 100) >= target
    got = sum(cost[i, h, i - rows[i][h] - 1] for i in range(6) for h in range(2) if rows[i][h] != i)
    assert got == pytest.approx(_brute_force(cost, target, max_block, keep_first))
    assert all(row == [i, i] for i, row in enumerate(rows[:keep_first]))


def test_unreachable_target_names_the_maximum():
    cost = np.zeros((4, 2, 1))  # depth 1: blocks of two layers at most
    cost[0] = np.nan
    with pytest.raises(
        KVConvertError, match=r"cannot be reached.*at most 25.0%.*blocks of at most 2"
    ):
        blocks_by_cost(cost, 0.3, 0, 0, 100)


def test_heal_seq_len_without_distant_tokens_is_refused_before_converting(deep_llama, tmp_path):
    with pytest.raises(KVConvertError, match="heal_seq_len: .* 8 tokens have no distant"):
        kvconvert.convert(
            deep_llama,
            str(tmp_path / "o"),
            target="pod",
            sink=2,
            recent=8,
            heal_steps=5,
            heal_seq_len=8,
            progress=False,
        )
    assert not (tmp_path / "o").exists()


def test_cost_needs_a_saving_target(deep_llama, tmp_path):
    with pytest.raises(
        KVConvertError, match="map_by: cost chooses the map that reaches a kv_saving"
    ):
        kvconvert.convert(
            deep_llama, str(tmp_path / "o"), target="pod", map_by="cost", progress=False
        )


def test_distant_bias_is_written_and_loads(deep_llama, tmp_path):
    common = dict(target="pod", kv_saving=0.1, sink=SINK, recent=RECENT, seq_len=T, progress=False)
    common.update(num_samples=4, batch_size=4)
    out = kvconvert.convert(deep_llama, str(tmp_path / "o"), distant_bias="0,-2,-8", **common)
    rep = json.loads((out / "kvconvert.json").read_text())
    written = json.loads((out / "config.json").read_text())
    pod_map, bias = rep["target"]["pod_map"], written["pod_distant_bias"]
    assert bias == rep["target"]["distant_bias"] and rep["target"]["distant_bias_grid"] == [
        0,
        -2,
        -8,
    ]
    chosen = [
        b for i, row in enumerate(pod_map) for h, b in zip(row, bias[i], strict=True) if h != i
    ]
    assert chosen and all(b in (0, -2, -8) for b in chosen)
    assert all(
        b == 0 for i, row in enumerate(pod_map) for h, b in zip(row, bias[i], strict=True) if h == i
    )
    assert "Bias on borrowed distant logits" in (out / "README.md").read_text()
    ids = token_ids(n=1, length=T, seed=5)
    model = load(out, trust_remote_code=True)
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    plain = kvconvert.convert(deep_llama, str(tmp_path / "p"), **common)
    assert "pod_distant_bias" not in json.loads((plain / "config.json").read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(distant_bias="0,-x"), "distant_bias: cannot read '0,-x'"),
        (dict(distant_bias="0,-inf"), "must be finite numbers"),
        (dict(distant_bias="0,-1", map_by="similarity"), "distant_bias: the bias is chosen with"),
        (dict(distant_bias="0,-1", kv_saving=None), "distant_bias: the bias is chosen with"),
    ],
)
def test_distant_bias_bad_input(deep_llama, tmp_path, extra, message):
    kw = dict(target="pod", kv_saving=0.1, sink=SINK, recent=RECENT, seq_len=T, progress=False)
    with pytest.raises(KVConvertError, match=message):
        kvconvert.convert(deep_llama, str(tmp_path / "o"), **{**kw, **extra})
    assert not (tmp_path / "o").exists()


def test_saving_target_records_cost_and_similarity(deep_llama, tmp_path):
    common = dict(target="pod", kv_saving=0.1, sink=SINK, recent=RECENT, seq_len=T, progress=False)
    common.update(num_samples=4, batch_size=4)
    out = kvconvert.convert(deep_llama, str(tmp_path / "o"), **common)
    rep = json.loads((out / "kvconvert.json").read_text())
    assert rep["target"]["map_by"] == "cost" and "least borrowing cost" in rep["target"]["map_from"]
    assert rep["target"]["predicted_kv_saving"] >= 0.1
    assert len(rep["borrow_cost"]["matrix"]) == 4 and len(rep["similarity"]["matrix"]) == 3
    sim = kvconvert.convert(deep_llama, str(tmp_path / "s"), map_by="similarity", **common)
    rep = json.loads((sim / "kvconvert.json").read_text())
    assert rep["target"]["map_by"] == "similarity" and rep["borrow_cost"]["matrix"] is None
    assert "most similar first" in rep["target"]["map_from"]
