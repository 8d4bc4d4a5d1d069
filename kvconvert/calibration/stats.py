"""Running second moments of each layer's q/k/v projections, accumulated batch by batch.

Only sums of outer products are kept (never the N x d activations): per layer, the full
(KV*d x KV*d) second moment of the keys and of the values (so any grouping of KV heads can be
solved later) and a (d x d) second moment per query head (to weight keys by the queries that
read them). Moments are uncentered and include projection biases, as the merge needs.
Products run in float32 on the model's device; sums are kept in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..arch import AttentionAdapter


@dataclass
class LayerStats:
    """Second moments of one attention layer's projections over ``count`` tokens."""

    k: torch.Tensor  # (KV*d, KV*d)
    v: torch.Tensor  # (KV*d, KV*d)
    q: torch.Tensor  # (H, d, d)
    count: int = 0

    def mean(self) -> LayerStats:
        n = max(self.count, 1)
        return LayerStats(self.k / n, self.v / n, self.q / n, self.count)


def _zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64, device=device)


class StatsCollector:
    """Forward hooks on q/k/v projections that add each batch's outer products to the sums."""

    def __init__(
        self,
        model: torch.nn.Module,
        adapter: AttentionAdapter,
        config: dict,
        layers: Iterable[int] | None = None,
    ):
        self.model = model
        self.adapter = adapter
        self.H = adapter.num_heads(config)
        self.KV = adapter.num_kv_heads(config)
        self.d = adapter.head_dim(config)
        n_layers = adapter.num_layers(config)
        self.layers = list(range(n_layers)) if layers is None else list(layers)
        device = next(model.parameters()).device
        kvd = self.KV * self.d
        self.stats = {
            i: LayerStats(
                _zeros((kvd, kvd), device),
                _zeros((kvd, kvd), device),
                _zeros((self.H, self.d, self.d), device),
            )
            for i in self.layers
        }
        self._handles: list = []

    def __enter__(self) -> StatsCollector:
        for i in self.layers:
            for proj in ("q", "k", "v"):
                mod = self.model.get_submodule(self.adapter.module_name(i, proj))
                self._handles.append(mod.register_forward_hook(self._hook(i, proj)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int, proj: str):
        st = self.stats[layer]

        def hook(_mod: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
            x = out.detach().reshape(-1, out.shape[-1]).float()
            if proj == "q":
                xh = x.view(x.shape[0], self.H, self.d)
                st.q += torch.einsum("nhd,nhe->hde", xh, xh).double()
                st.count += x.shape[0]
            elif proj == "k":
                st.k += (x.T @ x).double()
            else:
                st.v += (x.T @ x).double()

        return hook

    def result(self) -> dict[int, LayerStats]:
        """Mean second moments per layer."""
        return {i: s.mean() for i, s in self.stats.items()}


def weight_stats(
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    wv: torch.Tensor,
    bv: torch.Tensor | None,
    num_heads: int,
) -> LayerStats:
    """Data-free stand-in for activation moments: E[x x^T] = I gives W W^T (+ b b^T).

    This turns every activation-based solver into its weight-SVD counterpart (``svd-weights``).
    """

    def moment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        m = w @ w.T
        return m + torch.outer(b, b) if b is not None else m

    q = moment(wq, bq)
    d = wq.shape[0] // num_heads
    qh = torch.stack([q[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(num_heads)])
    return LayerStats(k=moment(wk, bk), v=moment(wv, bv), q=qh, count=1)
