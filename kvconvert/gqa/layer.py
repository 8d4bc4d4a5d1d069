"""One layer end to end: statistics + weights -> grouping -> merges -> folded weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import llama_decoder_types
from ..calibration.stats import LayerStats, weight_stats
from ..errors import KVConvertError
from ..recipe import Recipe
from ..source import Source
from . import budget as budget_mod
from . import grouping as grouping_mod
from .fold import AttentionWeights, fold_layer
from .qknorm import normed_weight_stats, through_norms
from .solve import Merge, objective_metrics, solve_real, solve_rope


@dataclass
class LayerShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class LayerResult:
    weights: AttentionWeights
    groups: list[tuple[int, ...]]
    key_merges: list[Merge]
    value_merges: list[Merge]
    #: relative output error before/after --refine-steps (refine.py); None: not refined
    refine_error: tuple[float, float] | None = field(default=None, kw_only=True)

    @property
    def key_error(self) -> float:
        """Relative residual energy of the keys, in the objective metric (0 = exact)."""
        return _rel(self.key_merges)

    @property
    def value_error(self) -> float:
        return _rel(self.value_merges)


def _rel(merges: list[Merge]) -> float:
    tot = sum(m.total for m in merges)
    return sum(m.error for m in merges) / tot if tot > 0 else 0.0


def choose_groups(
    grouping: str,
    kv: int,
    kv_heads: int,
    solve_k: Callable[[tuple[int, ...]], Merge],
    solve_v: Callable[[tuple[int, ...]], Merge],
    seed: int = 0,
) -> list[tuple[int, ...]]:
    """Adjacent groups, or the search's: cost = relative key + value energy a group loses."""
    if grouping != "search":
        return grouping_mod.adjacent(kv, kv_heads)
    k_tot = sum(solve_k((j,)).total for j in range(kv)) or 1.0
    v_tot = sum(solve_v((j,)).total for j in range(kv)) or 1.0

    def cost(g: tuple[int, ...]) -> float:
        return solve_k(g).error / k_tot + solve_v(g).error / v_tot

    return grouping_mod.search(kv, kv_heads, cost, seed=seed)


def merge_layer(
    w: AttentionWeights,
    stats: LayerStats | None,
    shape: LayerShape,
    kv_heads: int,
    method: str = "svd",
    rope_keys: str = "complex",
    objective: str = "output",
    grouping: str = "adjacent",
    seed: int = 0,
) -> LayerResult:
    """Merge one layer's KV heads down to ``kv_heads``; all math in the dtype of ``w`` (float64).

    ``stats`` are mean activation moments (from calibration); without them (``mean`` and
    ``svd-weights``), the weights' own moments stand in, which also serve for error reports.
    """
    kv, d = shape.num_kv_heads, shape.head_dim
    if method == "svd-weights" or stats is None:
        stats = weight_stats(w.wq, w.bq, w.wk, w.bk, w.wv, w.bv, shape.num_heads)
        if w.k_norm is not None:
            stats = normed_weight_stats(stats, w.q_norm, w.k_norm, kv, d)
    met_v = objective_metrics("v", objective, kv, d, shape.n_rep, wo=w.wo)
    met_k = objective_metrics("k", objective, kv, d, shape.n_rep, q_moments=stats.q)
    use_rope = rope_keys == "complex" and bool(shape.rope_pairs)

    def solve_k(g: tuple[int, ...]) -> Merge:
        if use_rope:
            return solve_rope(stats.k, g, met_k, d, method, shape.rope_pairs)
        return solve_real(stats.k, g, met_k, d, method)

    def solve_v(g: tuple[int, ...]) -> Merge:
        return solve_real(stats.v, g, met_v, d, method)

    groups = choose_groups(grouping, kv, kv_heads, solve_k, solve_v, seed)
    key_merges = [solve_k(g) for g in groups]
    value_merges = [solve_v(g) for g in groups]
    fold_k = key_merges
    if w.k_norm is not None:  # per-head q/k norms: see qknorm.py for the approximation
        fold_k, qn, kn = through_norms(key_merges, stats, w.q_norm, w.k_norm, shape.n_rep, d)
    new = fold_layer(w, fold_k, value_merges, shape.num_heads, kv, d)
    if w.k_norm is not None:
        new.q_norm, new.k_norm = qn, kn
    return LayerResult(new, groups, key_merges, value_merges)


def to_float64(w: AttentionWeights, device: torch.device | str) -> AttentionWeights:
    conv = {
        k: (None if v is None else v.to(device=device, dtype=torch.float64))
        for k, v in vars(w).items()
    }
    return AttentionWeights(**conv)


# --- a source's layers, as the target solves them ---------------------------------------
def check_kv_heads(src: Source, kv_heads: int) -> None:
    kv = src.num_kv_heads
    if kv_heads > kv or kv % kv_heads:
        divisors = [g for g in range(1, kv + 1) if kv % g == 0]
        raise KVConvertError(
            f"--kv-heads {kv_heads} must divide the model's {kv} KV heads "
            f"(choose one of {', '.join(map(str, divisors))})"
        )


def layer_counts(src: Source, recipe: Recipe) -> list[int]:
    """KV heads per layer from --kv-heads or --kv-heads-per-layer (--kv-budget: all, for now)."""
    if recipe.kv_heads_per_layer is not None:
        counts = budget_mod.parse_heads_per_layer(
            recipe.kv_heads_per_layer, src.num_layers, src.num_kv_heads
        )
    elif recipe.kv_budget is not None:
        budget_mod.budget_heads(recipe.kv_budget, src.num_layers, src.num_kv_heads)
        counts = [src.num_kv_heads] * src.num_layers
    else:
        check_kv_heads(src, recipe.kv_heads)
        counts = [recipe.kv_heads] * src.num_layers
    per_layer = needs_remote_code(recipe, counts) or recipe.kv_budget is not None
    if per_layer and not src.adapter.llama_decoder:
        raise KVConvertError(
            "--rope-keys project and per-layer KV heads are not available for "
            f"{src.config.get('model_type')!r} yet (supported: "
            f"{', '.join(llama_decoder_types())})"
        )
    return counts


def needs_remote_code(recipe: Recipe, counts: list[int]) -> bool:
    """Per-layer head counts or projected keys: no stock class can load the result."""
    return recipe.rope_keys == "project" or len(set(counts)) > 1


def layer_shape(src: Source) -> LayerShape:
    rope = src.adapter.rope_pairs(src.config)
    return LayerShape(src.num_heads, src.num_kv_heads, src.head_dim, rope)


def layer_weights(
    src: Source, layer: int, read: Mapping[str, torch.Tensor] | None = None
) -> AttentionWeights:
    """Layer ``layer``'s attention tensors as the solver takes them (q/k/v/o cut apart)."""
    return AttentionWeights.from_items(src.attention_items(layer, read))


def layer_tensors(res: LayerResult) -> dict[str, torch.Tensor | None]:
    """Module-relative names (q_proj.weight, ..., key_down) of a solved layer's tensors."""
    out = {f"{k[0]}_proj.{k[2:]}": v for k, v in res.weights.items().items()}
    if hasattr(res, "extra_tensors"):  # a run-time key projection (project.py)
        out.update(res.extra_tensors())
    return out


def layer_record(res: LayerResult) -> dict[str, Any]:
    """What kvconvert.json keeps of a solved layer (also the resume state's record)."""
    out: dict[str, Any] = {
        "groups": [list(g) for g in res.groups],
        "key_error": res.key_error,
        "value_error": res.value_error,
    }
    err = getattr(res, "refine_error", None)
    if err is not None:
        out["refine_error"] = {"before": err[0], "after": err[1]}
    return out


def check_finite(layer: int, new: Mapping[str, torch.Tensor | None]) -> None:
    bad = [k for k, v in new.items() if v is not None and not v.isfinite().all()]
    if bad:
        raise KVConvertError(f"layer {layer}: solved {', '.join(bad)} contain NaN/inf")
