"""Layer maps: which layer's keys each (layer, KV head) uses for distant tokens.

A map is ``pod_map[layer][kv_head] = bottom``: the first layer of the head's block of
consecutive layers (``bottom == layer``: the head keeps its own keys). Maps come from a
similarity threshold, a KV-saving target, or a user's JSON file.

``windows[layer]`` (optional) is the sliding window of a layer that keeps the stock sliding
cache (stock-architecture PoD outputs, e.g. Gemma 2's local layers): such a layer keeps its own
keys, lends them to nobody, and a block skips over it (``links``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..arch import held_tokens
from ..errors import KVConvertError


def identity_map(num_layers: int, num_kv_heads: int) -> list[list[int]]:
    return [[layer] * num_kv_heads for layer in range(num_layers)]


def num_blocks(pod_map: list[list[int]]) -> int:
    """B: the number of (KV head, block) pairs, i.e. of heads that keep all their keys."""
    return sum(b == layer for layer, row in enumerate(pod_map) for b in row)


def full_layers(num_layers: int, windows: list[int | None] | None = None) -> list[int]:
    """The full-attention layers (no sliding window): the only ones that may share keys."""
    return [layer for layer, w in enumerate(windows or [None] * num_layers) if w is None]


def bias_per_head(
    pod_map: list[list[int]], bias: np.ndarray, windows: list[int | None] | None = None
) -> list[list[float]]:
    """Per (layer, KV head), the distant bias ``bias[l, h, d - 1]`` of the bottom it borrows
    from (d links down the chain of full-attention layers); 0 where it keeps its own keys."""
    chain = full_layers(len(pod_map), windows)
    return [
        [
            0.0
            if bottom == layer
            else float(bias[layer, h, chain.index(layer) - chain.index(bottom) - 1])
            for h, bottom in enumerate(row)
        ]
        for layer, row in enumerate(pod_map)
    ]


def links(num_layers: int, windows: list[int | None] | None = None) -> list[int | None]:
    """Per layer, the layer whose block it may join: the previous full-attention layer (None
    for the first one and for sliding-window layers)."""
    windows = windows or [None] * num_layers
    prev: list[int | None] = []
    last = None
    for layer, w in enumerate(windows):
        prev.append(last if w is None else None)
        if w is None:
            last = layer
    return prev


def predicted_saving(
    pod_map: list[list[int]],
    sink: int,
    recent: int,
    context: int,
    windows: list[int | None] | None = None,
) -> float:
    """Fraction of the dense KV cache saved after ``context`` tokens.

    Each borrowing (layer, head) keeps keys of only P = sink + recent tokens instead of T. With
    full caches everywhere this is 1/2 * (1 - B / (L * KV)) * (T - P) / T (0 when T <= P); a
    sliding-window layer holds only its window (``arch.held_tokens``), as the stock cache does."""
    kv = len(pod_map[0])
    windows = windows or [None] * len(pod_map)
    dense = kv * sum(held_tokens(context, w) for w in windows)
    borrowing = sum(b != layer for layer, row in enumerate(pod_map) for b in row)
    far = max(context - sink - recent, 0)
    return borrowing * far / (2 * dense)


def map_from_joins(joined: np.ndarray, prev: list[int | None] | None = None) -> list[list[int]]:
    """``joined[l, h]``: layer l joins the block of ``prev[l]`` for head h -> a pod_map."""
    num_layers, kv = joined.shape
    prev = prev or links(num_layers)
    rows = identity_map(num_layers, kv)
    for layer in range(1, num_layers):
        for h in range(kv):
            if joined[layer, h] and prev[layer] is not None:
                rows[layer][h] = rows[prev[layer]][h]
    return rows


def _run_length(joined: np.ndarray, layer: int, head: int, prev: list[int | None]) -> int:
    """Length of the block that would contain ``layer`` if it joined its predecessor."""
    nxt = {p: k for k, p in enumerate(prev) if p is not None}
    size, lo = 1, layer
    while joined[lo, head] and prev[lo] is not None:
        lo, size = prev[lo], size + 1
    hi = layer
    while hi in nxt and joined[nxt[hi], head]:
        hi, size = nxt[hi], size + 1
    return size


def _allowed(layer: int, keep_first: int) -> bool:
    return layer >= max(keep_first, 1)


def blocks_from_threshold(
    similarity: np.ndarray,
    threshold: float,
    max_block: int | None = None,
    keep_first: int = 0,
    windows: list[int | None] | None = None,
) -> list[list[int]]:
    """Greedy blocks per head: layer l joins its predecessor's block while their similarity
    (``similarity[l - 1, h]``) is at least ``threshold`` and the block stays <= ``max_block``."""
    num_layers = similarity.shape[0] + 1
    prev = links(num_layers, windows)
    joined = np.zeros((num_layers, similarity.shape[1]), dtype=bool)
    for h in range(similarity.shape[1]):
        size = {}
        for layer in range(num_layers):
            p = prev[layer]
            ok = p is not None and _allowed(layer, keep_first)
            ok = ok and bool(similarity[layer - 1, h] >= threshold)
            if ok and (max_block is None or size[p] < max_block):
                joined[layer, h] = True
                size[layer] = size[p] + 1
            else:
                size[layer] = 1
    return map_from_joins(joined, prev)


def blocks_for_saving(
    similarity: np.ndarray,
    target: float,
    sink: int,
    recent: int,
    context: int,
    max_block: int | None = None,
    keep_first: int = 0,
    windows: list[int | None] | None = None,
) -> list[list[int]]:
    """Take the most similar (layer, head) merges first until the predicted saving reaches
    ``target``; raise KVConvertError naming the reachable maximum when it cannot."""
    num_layers, kv = similarity.shape[0] + 1, similarity.shape[1]
    prev = links(num_layers, windows)
    joined = np.zeros((num_layers, kv), dtype=bool)
    order = np.argsort(-np.nan_to_num(similarity, nan=-np.inf), axis=None, kind="stable")
    pod_map = map_from_joins(joined, prev)
    if predicted_saving(pod_map, sink, recent, context, windows) >= target:
        return pod_map
    for flat in order:
        layer, h = divmod(int(flat), kv)
        layer += 1
        if prev[layer] is None or not _allowed(layer, keep_first):
            continue
        joined[layer, h] = True
        if max_block is not None and _run_length(joined, layer, h, prev) > max_block:
            joined[layer, h] = False
            continue
        pod_map = map_from_joins(joined, prev)
        if predicted_saving(pod_map, sink, recent, context, windows) >= target:
            return pod_map
    best = predicted_saving(pod_map, sink, recent, context, windows)
    why = "the saving is capped at 50% since values are never shared"
    if windows and any(windows):
        why += ", and sliding-window layers never share"
    raise unreachable(target, context, sink, recent, max_block, keep_first, best, why)


def unreachable(
    target: float,
    context: int,
    sink: int,
    recent: int,
    max_block: int | None,
    keep_first: int,
    best: float,
    why: str,
) -> KVConvertError:
    """The error of a --kv-saving target no map reaches, naming the reachable maximum."""
    return KVConvertError(
        f"kv_saving: {target:.1%} cannot be reached at {context} tokens with sink {sink}, "
        f"recent {recent}, max_block {max_block}, keep_first {keep_first}: at most {best:.1%} "
        f"({why})"
    )


def saving_per_borrower(
    num_layers: int,
    kv: int,
    sink: int,
    recent: int,
    context: int,
    windows: list[int | None] | None = None,
) -> float:
    """The predicted saving one borrowing (layer, KV head) brings: all borrowers save the same
    (``predicted_saving`` counts them), so a target needs ceil(target / this) of them."""
    full = full_layers(num_layers, windows)
    if len(full) < 2:
        return 0.0
    one = identity_map(num_layers, kv)
    one[full[1]][0] = full[0]
    return predicted_saving(one, sink, recent, context, windows)


def _head_costs(
    cost: np.ndarray, h: int, chain: list[int], depth: int, keep_first: int
) -> tuple[np.ndarray, list[list[tuple[int, int] | None]]]:
    """For one KV head, over the chain of layers that may share: best[k] = the least summed
    cost of covering the whole chain with blocks holding k borrowers, and back-pointers."""
    n = len(chain)
    best = np.full((n + 1, n), np.inf)  # best[p + 1, k]: chain[0..p] covered, k borrowers
    best[0, 0] = 0
    back: list[list[tuple[int, int] | None]] = [[None] * n for _ in range(n + 1)]
    for p in range(n):  # the block ending at chain[p] starts at chain[s]
        for s in range(p, max(-1, p - depth - 1), -1):
            upper = chain[s + 1 : p + 1]
            if any(not _allowed(layer, keep_first) for layer in upper):
                break
            c = sum(float(cost[layer, h, j]) for j, layer in enumerate(upper))
            if not np.isfinite(c):
                break
            k_block = p - s
            for k in range(n - k_block):
                total = best[s, k] + c
                if total < best[p + 1, k + k_block]:
                    best[p + 1, k + k_block] = total
                    back[p + 1][k + k_block] = (s, k)
    return best[n], back


def blocks_by_cost(
    cost: np.ndarray,
    target: float,
    sink: int,
    recent: int,
    context: int,
    max_block: int | None = None,
    keep_first: int = 0,
    windows: list[int | None] | None = None,
) -> list[list[int]]:
    """The map reaching ``target`` with the least summed borrowing cost (``cost.py``).

    ``cost[l, h, d - 1]``: layer l, KV head h reading the keys of the layer d links down.
    A block's cost is the sum of its upper layers' costs against its bottom; per head, a
    dynamic programme over block boundaries gives the least cost for each number of
    borrowers, and a second one splits the borrowers the target needs between the heads."""
    num_layers, kv, depth = cost.shape
    if max_block is not None:
        depth = min(depth, max_block - 1)
    chain = full_layers(num_layers, windows)
    each = saving_per_borrower(num_layers, kv, sink, recent, context, windows)
    need = math.ceil(target / each - 1e-9) if each > 0 else None
    per_head = [_head_costs(cost, h, chain, depth, keep_first) for h in range(kv)]
    # split ``need`` borrowers between heads: total[h + 1][k] = least cost over heads 0..h
    total = np.full((kv + 1, len(chain) * kv + 1), np.inf)
    total[0, 0] = 0
    split = np.zeros((kv + 1, len(chain) * kv + 1), dtype=int)
    for h, (best, _) in enumerate(per_head):
        for k0 in np.flatnonzero(np.isfinite(total[h])):
            for k, c in enumerate(best):
                if np.isfinite(c) and total[h, k0] + c < total[h + 1, k0 + k]:
                    total[h + 1, k0 + k] = total[h, k0] + c
                    split[h + 1, k0 + k] = k
    reachable = np.flatnonzero(np.isfinite(total[kv]))
    if need is None or need > reachable.max():
        best = each * int(reachable.max())
        why = f"blocks of at most {depth + 1} layers; values are never shared"
        raise unreachable(target, context, sink, recent, max_block, keep_first, best, why)
    rows = identity_map(num_layers, kv)
    k = need
    for h in range(kv - 1, -1, -1):
        kh = int(split[h + 1, k])
        k -= kh
        _, back = per_head[h]
        p, kk = len(chain), kh
        while p > 0:
            s, k_before = back[p][kk]
            for layer in chain[s + 1 : p]:
                rows[layer][h] = chain[s]
            p, kk = s, k_before
    check_map(rows, num_layers, kv, windows)
    return rows


def load_map(
    path: str | Path, num_layers: int, num_kv_heads: int, windows: list[int | None] | None = None
) -> list[list[int]]:
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
    check_map(data, num_layers, num_kv_heads, windows)
    return data


def check_map(
    pod_map: list[list[int]],
    num_layers: int,
    num_kv_heads: int,
    windows: list[int | None] | None = None,
) -> None:
    if len(pod_map) != num_layers or any(len(r) != num_kv_heads for r in pod_map):
        raise KVConvertError(
            f"pod_map: needs {num_layers} rows (layers) of {num_kv_heads} entries (KV heads)"
        )
    windows = windows or [None] * num_layers
    full = full_layers(num_layers, windows)
    for layer, row in enumerate(pod_map):
        for h, b in enumerate(row):
            if not isinstance(b, int) or not 0 <= b <= layer:
                raise KVConvertError(f"pod_map[{layer}][{h}] = {b!r} must be a layer <= {layer}")
            if b != layer and (windows[layer] is not None or windows[b] is not None):
                raise KVConvertError(
                    f"pod_map[{layer}][{h}] = {b}: sliding-window layers "
                    f"{[i for i, w in enumerate(windows) if w is not None]} keep their own keys "
                    "and lend them to nobody"
                )
            if any(pod_map[k][h] != b for k in full if b <= k <= layer):
                raise KVConvertError(
                    f"pod_map[{layer}][{h}] = {b}: layers {b}..{layer} must all use layer {b} "
                    f"for head {h} (a block is a run of consecutive layers)"
                )


def describe(pod_map: list[list[int]]) -> str:
    """Blocks per KV head, e.g. "h0: 0-2 3 4; h1: 0 1-4" ("1,3": a block skipping layer 2)."""
    out = []
    for h in range(len(pod_map[0])):
        blocks: dict[int, list[int]] = {}
        for layer, row in enumerate(pod_map):
            blocks.setdefault(row[h], []).append(layer)

        def text(b: list[int]) -> str:
            if len(b) == 1:
                return str(b[0])
            if b[-1] - b[0] == len(b) - 1:
                return f"{b[0]}-{b[-1]}"
            return ",".join(map(str, b))

        out.append(f"h{h}: " + " ".join(text(b) for b in blocks.values()))
    return "; ".join(out)
