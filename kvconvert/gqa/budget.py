"""Per-layer KV budgets: how many KV heads each layer keeps (``--kv-budget``).

Layers differ enormously in how much merging hurts them. For every layer and every candidate
head count (a divisor of its current count) the layer alone is merged, swapped into the
calibration model, and the KL divergence of the next-token distributions to the original is
measured on calibration sequences: that is the layer's sensitivity at that count. Assuming the
losses of different layers add up, the allocation with the least total loss whose KV cache
fits the budget is a small knapsack, solved exactly by dynamic programming over the number of
KV heads kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import KVConvertError
from ..eta import Estimate


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def parse_heads_per_layer(text: str | list[int], num_layers: int, kv: int) -> list[int]:
    """'4,2,2,1,1' (or a list) -> per-layer counts, each a divisor of the current ``kv``."""
    try:
        items = text.split(",") if isinstance(text, str) else list(text)
        counts = [int(x) for x in items]
    except (TypeError, ValueError):
        raise KVConvertError(
            f"kv_heads_per_layer: cannot read {text!r} (e.g. 4,2,2,1,1: one count per layer)"
        ) from None
    if len(counts) != num_layers:
        raise KVConvertError(
            f"kv_heads_per_layer: {len(counts)} counts given, the model has {num_layers} layers"
        )
    bad = [c for c in counts if c < 1 or kv % c]
    if bad:
        raise KVConvertError(
            f"kv_heads_per_layer: {bad[0]} does not divide the model's {kv} KV heads "
            f"(choose from {', '.join(map(str, divisors(kv)))})"
        )
    return counts


@dataclass
class Allocation:
    """The chosen per-layer counts and the measurements behind them."""

    counts: list[int]
    budget_heads: int  # most KV heads (summed over layers) the budget allows
    #: sensitivities[layer][count] = KL (nats/token) with only that layer merged to count
    sensitivities: list[dict[int, float]] = field(default_factory=list)
    predicted_kl: float = 0.0  # sum of the chosen layers' sensitivities

    def to_dict(self) -> dict:
        return {
            "counts": self.counts,
            "budget_heads": self.budget_heads,
            "predicted_kl": self.predicted_kl,
            "sensitivity_kl": [{str(c): v for c, v in s.items()} for s in self.sensitivities],
        }


def knapsack(sensitivities: list[dict[int, float]], capacity: int) -> list[int]:
    """Per-layer counts minimising the summed sensitivity with sum(counts) <= capacity.

    Exact DP over (layer, heads used so far). Ties go to fewer heads (a smaller cache).
    """
    inf = float("inf")
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for sens in sensitivities:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (loss, picks) in best.items():
            for c, s in sorted(sens.items()):
                u = used + c
                if u > capacity:
                    continue
                cand = (loss + s, [*picks, c])
                if cand[0] < nxt.get(u, (inf, []))[0] - 1e-15:
                    nxt[u] = cand
        best = nxt
    if not best:
        raise KVConvertError("kv_budget: too small; every layer needs at least one KV head")
    return min(best.items(), key=lambda kv: (kv[1][0], kv[0]))[1][1]


@torch.inference_mode()
def measure_sensitivities(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    num_layers: int,
    candidates: list[int],
    swap: Callable[[int, int], Callable[[], None]],
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict[int, float]]:
    """KL(original || layer i merged to c) per layer and candidate, on ``tokens``.

    ``swap(i, c)`` installs layer i merged to c heads into ``model`` and returns a function
    that restores the original layer. The reference log-probabilities are computed once.
    """
    device = next(model.parameters()).device
    chunks = [tokens[s : s + batch_size].to(device) for s in range(0, tokens.shape[0], batch_size)]
    ref = [F.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1) for b in chunks]
    full = max(candidates)
    out: list[dict[int, float]] = []
    merges = num_layers * (len(candidates) - 1)
    bar = tqdm(total=merges, desc="layer sensitivity", unit="merge", disable=not progress)
    eta = Estimate("layer sensitivity (--kv-budget)", merges, "merges", enabled=progress)
    for i in range(num_layers):
        sens = {full: 0.0}
        for c in candidates:
            if c == full:
                continue
            restore = swap(i, c)
            try:
                total, count = 0.0, 0
                for b, lp in zip(chunks, ref, strict=True):
                    lq = F.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1)
                    total += float((lp.exp() * (lp - lq)).sum())
                    count += b.numel()
            finally:
                restore()
            sens[c] = total / max(count, 1)
            bar.update(1)
            eta.update()
        out.append(sens)
    bar.close()
    return out


def budget_heads(fraction: float, num_layers: int, kv: int) -> int:
    """KV heads (summed over layers) that ``fraction`` of the cache holds; checked feasible."""
    capacity = int(fraction * num_layers * kv + 1e-9)
    if capacity < num_layers:
        raise KVConvertError(
            f"kv_budget: {fraction} keeps {capacity} KV heads in total but the model has "
            f"{num_layers} layers, each needing at least one (smallest budget: {1 / kv:.3g})"
        )
    return capacity


def allocate(sensitivities: list[dict[int, float]], kv: int, fraction: float) -> Allocation:
    """The least-loss allocation whose KV heads total at most ``fraction`` of the original."""
    capacity = budget_heads(fraction, len(sensitivities), kv)
    counts = knapsack(sensitivities, capacity)
    pred = sum(s[c] for s, c in zip(sensitivities, counts, strict=True))
    return Allocation(counts, capacity, sensitivities, pred)
