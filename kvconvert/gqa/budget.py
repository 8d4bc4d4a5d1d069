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


#: Sequences per forward + backward pass of the Fisher estimate: the pass keeps several
#: vocabulary-sized tensors per token (logits, log-probabilities, their gradients), 400 MB each
#: for 8 x 256 tokens of a 49K vocabulary in float32, so it goes two sequences at a time.
GRADIENT_BATCH = 2
#: Label draws (backward passes) per sequence: the estimate's noise falls as 1/sqrt(draws x
#: sequences)
FISHER_DRAWS = 4


@torch.no_grad()
def fisher_sensitivities(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    attentions: list[torch.nn.Module],
    candidates: list[int],
    merged: Callable[[int, int], torch.nn.Module],
    batch_size: int = 8,
    draws: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[int, float]]:
    """The same KL as :func:`measure_sensitivities`, estimated from one forward pass and
    ``draws`` backward passes instead of a forward per layer and candidate.

    Merging layer i changes its attention output by d_i (the merged module's output minus the
    original's, on the layer's own input). To second order the KL to the original is the
    Fisher quadratic form 1/2 E_y[(g_i . d_i)^2], where g_i is the gradient of log p(y) (the
    sequence's tokens y drawn from the model's own next-token distributions) with respect to
    layer i's attention output. One backward pass gives g_i for every layer at once; each
    (layer, candidate) then costs one run of that attention module alone. The estimate is
    unbiased for the quadratic form; ``draws`` label draws per sequence average its noise.
    docs/methods.md ("Per-layer KV budgets") compares it with the measured KL.
    """
    device = next(model.parameters()).device
    draws = draws or FISHER_DRAWS
    n = len(attentions)
    full = max(candidates)
    out: list[dict[int, float]] = [{full: 0.0} for _ in range(n)]
    count = 0
    gen = torch.Generator(device=device).manual_seed(seed)
    step = min(batch_size, GRADIENT_BATCH)
    chunks = [tokens[s : s + step] for s in range(0, tokens.shape[0], step)]
    merges = n * (len(candidates) - 1)
    bar = tqdm(total=len(chunks) * (draws + merges), desc="layer sensitivity", disable=not progress)
    for b in chunks:
        b = b.to(device).clone()  # an ordinary tensor: ids from inference mode can't be saved
        seen, grads = _attention_gradients(model, b, attentions, draws, gen)
        bar.update(draws)
        for i in range(n):
            inputs, options, orig = seen[i]
            for c in candidates:
                if c == full:
                    continue
                module = merged(i, c)
                new = module(*inputs, **options)
                delta = (new[0] if isinstance(new, tuple) else new).float() - orig.float()
                del module
                for g in grads:
                    per_seq = (g[i].float() * delta).flatten(1).sum(1)
                    out[i][c] = out[i].get(c, 0.0) + 0.5 * float((per_seq**2).sum()) / draws
                bar.update(1)
        count += b.numel()
    bar.close()
    return [{c: v / max(count, 1) if c != full else 0.0 for c, v in s.items()} for s in out]


def _attention_gradients(
    model: torch.nn.Module,
    ids: torch.Tensor,
    attentions: list[torch.nn.Module],
    draws: int,
    gen: torch.Generator,
) -> tuple[list[tuple], list[list[torch.Tensor]]]:
    """One forward pass over ``ids``, then ``draws`` backward passes of log p(y) for tokens y
    drawn from the model's own distributions. Returns, per layer, the attention module's
    inputs and output, and, per draw, the gradient of log p(y) w.r.t. each layer's output."""
    seen: list[tuple] = [()] * len(attentions)

    def keep(i: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[i] = (
                tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                out,
            )

        return hook

    def leaf(module, args, output):  # the graph starts at the embeddings
        return output.detach().requires_grad_(True)

    handles = [model.get_input_embeddings().register_forward_hook(leaf)]
    handles += [
        a.register_forward_hook(keep(i), with_kwargs=True) for i, a in enumerate(attentions)
    ]
    try:
        with torch.enable_grad():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    finally:
        for h in handles:
            h.remove()
    probs = logp.detach().exp().flatten(0, 1)
    grads = []
    for k in range(draws):
        y = torch.multinomial(probs, 1, generator=gen).view(*ids.shape, 1)
        with torch.enable_grad():
            got = torch.autograd.grad(
                logp.gather(-1, y).sum(), [s[2] for s in seen], retain_graph=k < draws - 1
            )
        grads.append([g.detach() for g in got])
    return [(a, kw, out.detach()) for a, kw, out in seen], grads


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
