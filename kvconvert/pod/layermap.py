"""Layer maps: which layer's keys each (layer, KV head) uses for distant tokens.

A map is ``pod_map[layer][kv_head] = bottom``: the first layer of the head's block of
consecutive layers (``bottom == layer``: the head keeps its own keys). Maps come from a
similarity threshold, a KV-saving target, or a user's JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import KVConvertError


def identity_map(num_layers: int, num_kv_heads: int) -> list[list[int]]:
    return [[layer] * num_kv_heads for layer in range(num_layers)]


def num_blocks(pod_map: list[list[int]]) -> int:
    """B: the number of (KV head, block) pairs, i.e. of heads that keep all their keys."""
    return sum(b == layer for layer, row in enumerate(pod_map) for b in row)


def predicted_saving(pod_map: list[list[int]], sink: int, recent: int, context: int) -> float:
    """Fraction of the dense KV cache saved after ``context`` tokens:
    1/2 * (1 - B / (L * KV)) * (T - P) / T, with P = sink + recent (0 when T <= P)."""
    pairs = len(pod_map) * len(pod_map[0])
    far = max(context - sink - recent, 0)
    return 0.5 * (1 - num_blocks(pod_map) / pairs) * far / context


def map_from_joins(joined: np.ndarray) -> list[list[int]]:
    """``joined[l, h]``: layer l joins the block of layer l - 1 for head h -> a pod_map."""
    num_layers, kv = joined.shape
    rows = identity_map(num_layers, kv)
    for layer in range(1, num_layers):
        for h in range(kv):
            if joined[layer, h]:
                rows[layer][h] = rows[layer - 1][h]
    return rows


def _run_length(joined: np.ndarray, layer: int, head: int) -> int:
    """Length of the block that would contain ``layer`` if it joined its predecessor."""
    lo = layer - 1
    while lo > 0 and joined[lo, head]:
        lo -= 1
    hi = layer
    while hi + 1 < joined.shape[0] and joined[hi + 1, head]:
        hi += 1
    return hi - lo + 1


def _allowed(layer: int, keep_first: int) -> bool:
    return layer >= max(keep_first, 1)


def blocks_from_threshold(
    similarity: np.ndarray, threshold: float, max_block: int | None = None, keep_first: int = 0
) -> list[list[int]]:
    """Greedy blocks per head: layer l joins layer l - 1's block while their similarity
    (``similarity[l - 1, h]``) is at least ``threshold`` and the block stays <= ``max_block``."""
    num_layers = similarity.shape[0] + 1
    joined = np.zeros((num_layers, similarity.shape[1]), dtype=bool)
    for h in range(similarity.shape[1]):
        size = 1
        for layer in range(1, num_layers):
            ok = _allowed(layer, keep_first) and similarity[layer - 1, h] >= threshold
            if ok and (max_block is None or size < max_block):
                joined[layer, h] = True
                size += 1
            else:
                size = 1
    return map_from_joins(joined)


def blocks_for_saving(
    similarity: np.ndarray,
    target: float,
    sink: int,
    recent: int,
    context: int,
    max_block: int | None = None,
    keep_first: int = 0,
) -> list[list[int]]:
    """Take the most similar (layer, head) merges first until the predicted saving reaches
    ``target``; raise KVConvertError naming the reachable maximum when it cannot."""
    num_layers, kv = similarity.shape[0] + 1, similarity.shape[1]
    joined = np.zeros((num_layers, kv), dtype=bool)
    order = np.argsort(-similarity, axis=None, kind="stable")
    pod_map = map_from_joins(joined)
    if predicted_saving(pod_map, sink, recent, context) >= target:
        return pod_map
    for flat in order:
        layer, h = divmod(int(flat), kv)
        layer += 1
        if not _allowed(layer, keep_first):
            continue
        joined[layer, h] = True
        if max_block is not None and _run_length(joined, layer, h) > max_block:
            joined[layer, h] = False
            continue
        pod_map = map_from_joins(joined)
        if predicted_saving(pod_map, sink, recent, context) >= target:
            return pod_map
    best = predicted_saving(pod_map, sink, recent, context)
    raise KVConvertError(
        f"kv_saving: {target:.1%} cannot be reached at {context} tokens with sink {sink}, "
        f"recent {recent}, max_block {max_block}, keep_first {keep_first}: at most {best:.1%} "
        "(the saving is capped at 50% since values are never shared)"
    )


def load_map(path: str | Path, num_layers: int, num_kv_heads: int) -> list[list[int]]:
    """A map from JSON: ``[[bottom per KV head] per layer]``, ``[bottom per layer]`` (all heads
    alike), or an object with a ``pod_map`` key (e.g. a previous output's config.json)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise KVConvertError(f"pod_map: cannot read {p}: {e}") from None
    if isinstance(data, dict):
        data = data.get("pod_map", data.get("target", {}).get("pod_map"))
    if isinstance(data, list) and all(isinstance(b, int) for b in data):
        data = [[b] * num_kv_heads for b in data]
    if not isinstance(data, list) or not all(isinstance(r, list) for r in data):
        raise KVConvertError(f"pod_map: {p} holds no list of per-layer rows")
    check_map(data, num_layers, num_kv_heads)
    return data


def check_map(pod_map: list[list[int]], num_layers: int, num_kv_heads: int) -> None:
    if len(pod_map) != num_layers or any(len(r) != num_kv_heads for r in pod_map):
        raise KVConvertError(
            f"pod_map: needs {num_layers} rows (layers) of {num_kv_heads} entries (KV heads)"
        )
    for layer, row in enumerate(pod_map):
        for h, b in enumerate(row):
            if not isinstance(b, int) or not 0 <= b <= layer:
                raise KVConvertError(f"pod_map[{layer}][{h}] = {b!r} must be a layer <= {layer}")
            if any(pod_map[k][h] != b for k in range(b, layer + 1)):
                raise KVConvertError(
                    f"pod_map[{layer}][{h}] = {b}: layers {b}..{layer} must all use layer {b} "
                    f"for head {h} (a block is a run of consecutive layers)"
                )


def describe(pod_map: list[list[int]]) -> str:
    """Blocks per KV head, e.g. "h0: 0-2 3 4; h1: 0 1-4"."""
    out = []
    for h in range(len(pod_map[0])):
        blocks: list[list[int]] = []
        for layer, row in enumerate(pod_map):
            if row[h] == layer:
                blocks.append([layer])
            else:
                blocks[-1].append(layer)
        text = " ".join(f"{b[0]}-{b[-1]}" if len(b) > 1 else str(b[0]) for b in blocks)
        out.append(f"h{h}: {text}")
    return "; ".join(out)
