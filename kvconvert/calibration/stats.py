"""Running second moments of each layer's q/k/v projections, accumulated batch by batch.

Only sums of outer products are kept (never the N x d activations): per layer, the full
(KV*d x KV*d) second moment of the keys and of the values (so any grouping of KV heads can be
solved later) and a (d x d) second moment per query head (to weight keys by the queries that
read them). Moments are uncentered and include projection biases, as the merge needs.
Where the adapter has per-head q/k norms, q and k are taken after the norm (what RoPE sees) and
the mean square of each raw key head (the norm's input) is kept too. Fused qkv outputs are cut
by the adapter.
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
    #: (KV,) mean square of each raw key head before a per-head k norm (None without one)
    k_ms: torch.Tensor | None = None

    def mean(self) -> LayerStats:
        n = max(self.count, 1)
        k_ms = self.k_ms / n if self.k_ms is not None else None
        return LayerStats(self.k / n, self.v / n, self.q / n, self.count, k_ms)


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
                k_ms=_zeros((self.KV,), device) if adapter.has_qk_norm else None,
            )
            for i in self.layers
        }
        self._handles: list = []

    def __enter__(self) -> StatsCollector:
        for i in self.layers:
            for name, (role, take) in self.adapter.stat_modules(i).items():
                mod = self.model.get_submodule(name)
                self._handles.append(mod.register_forward_hook(self._hook(i, role, take)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int, role: str, take: tuple[str, ...]):
        st = self.stats[layer]

        def hook(_mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
            parts = self.adapter.split_activation(role, out.detach(), self.H, self.d)
            for proj in take:
                x = parts[proj].reshape(-1, self._width(proj)).float()
                if proj == "q":
                    xh = x.view(x.shape[0], self.H, self.d)
                    st.q += torch.einsum("nhd,nhe->hde", xh, xh).double()
                    st.count += x.shape[0]
                elif proj == "k":
                    st.k += (x.T @ x).double()
                    if st.k_ms is not None:
                        raw = inp[0].detach().reshape(-1, self.KV, self.d).float()
                        st.k_ms += raw.pow(2).mean(-1).sum(0).double()
                else:
                    st.v += (x.T @ x).double()

        return hook

    def _width(self, proj: str) -> int:
        return (self.H if proj == "q" else self.KV) * self.d

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
