"""``--rope-keys project``: the GQA paper's key merge, a PCA of keys *after* RoPE.

Per group of t old key heads, the rotated keys k = [R k_1; ...; R k_t] (t*d) are projected to
one head y = enc @ k (d), which is what the cache stores; old head j is read back as
dec_j @ y. RoPE's rotation R depends on the position, so dec_j cannot be folded into q_proj
(methods.md 1.3): the checkpoint keeps the full-width ``k_proj`` and carries, per layer,

    key_down    (G, d, t*d)  the encoders (applied to the rotated keys at run time)
    query_down  (H, d, d)    dec_j^T for each query head reading j (applied to rotated queries)

and needs the remote-code model (kvconvert/modeling). Values are merged as in every other mode
(folded into v_proj and o_proj). The statistics are second moments of rotated keys and
queries, collected with the model's own rotary embedding on the calibration positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import AttentionAdapter
from ..calibration.stats import LayerStats, StatsCollector, weight_stats
from .fold import AttentionWeights, fold_layer
from .layer import LayerResult, LayerShape, choose_groups
from .solve import Merge, objective_metrics, solve_real


@dataclass
class ProjectedLayerResult(LayerResult):
    """A merged layer whose keys are projected after RoPE (weights keep k_proj full width)."""

    key_down: torch.Tensor | None = None  # (G, d, t*d)
    query_down: torch.Tensor | None = None  # (H, d, d)
    key_heads: int = 0  # heads produced by k_proj (the old KV count)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the remote-code attention needs beyond q/k/v/o, by module-relative name."""
        return {"key_down": self.key_down, "query_down": self.query_down}


class RotatedStatsCollector(StatsCollector):
    """Like StatsCollector, but keys and queries are rotated by RoPE before accumulating.

    Calibration batches are dense and start at position 0, so position n of a sequence is
    token n; cos/sin come from the model's own rotary module (any rope type it supports).
    """

    def __init__(self, model: torch.nn.Module, adapter: AttentionAdapter, config: dict, **kw):
        super().__init__(model, adapter, config, **kw)
        self.pairs = adapter.rope_pairs(config)
        rot = [m for m in model.modules() if hasattr(m, "inv_freq") and callable(m)]
        if not rot or not self.pairs:
            raise ValueError("--rope-keys project needs a RoPE model with a rotary module")
        self.rotary = rot[0]
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, x: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq not in self._tables:
            pos = torch.arange(seq, device=x.device)[None]
            cos, sin = self.rotary(x, pos)  # (1, seq, r): cat(freqs, freqs) layout
            f = len(self.pairs)
            self._tables[seq] = (cos[0, :, :f].float(), sin[0, :, :f].float())
        return self._tables[seq]

    def rotate(self, out: torch.Tensor, heads: int) -> torch.Tensor:
        """(batch, seq, heads*d) pre-RoPE projections -> rotated, flattened to (N, heads*d)."""
        b, s, _ = out.shape
        x = out.detach().float().view(b, s, heads, self.d)
        cos, sin = self._cos_sin(out, s)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        a = torch.tensor([p[0] for p in self.pairs], device=x.device)
        c = torch.tensor([p[1] for p in self.pairs], device=x.device)
        xa, xc = x[..., a], x[..., c]
        y = x.clone()
        y[..., a] = xa * cos - xc * sin
        y[..., c] = xc * cos + xa * sin
        return y.reshape(b * s, heads * self.d)

    def _hook(self, layer: int, role: str, take: tuple[str, ...]):
        st = self.stats[layer]

        def hook(_mod: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
            parts = self.adapter.split_activation(role, out.detach(), self.H, self.d)
            for proj in take:
                y = parts[proj]
                if proj == "v":
                    x = y.reshape(-1, y.shape[-1]).float()
                    st.v += (x.T @ x).double()
                elif proj == "k":
                    x = self.rotate(y, self.KV)
                    st.k += (x.T @ x).double()
                else:
                    x = self.rotate(y, self.H).view(-1, self.H, self.d)
                    st.q += torch.einsum("nhd,nhe->hde", x, x).double()
                    st.count += x.shape[0]

        return hook


def _passthrough(members: tuple[int, ...], d: int, like: torch.Tensor) -> Merge:
    """A key 'merge' that leaves q_proj untouched in fold_layer (projection happens later)."""
    t = len(members)
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    enc = torch.cat([eye] + [torch.zeros_like(eye)] * (t - 1), dim=1)
    return Merge(tuple(members), enc, torch.cat([eye] * t, dim=0), 0.0, 0.0)


def project_layer(
    w: AttentionWeights,
    stats: LayerStats | None,
    shape: LayerShape,
    kv_heads: int,
    method: str = "svd",
    objective: str = "output",
    grouping: str = "adjacent",
    seed: int = 0,
) -> ProjectedLayerResult:
    """Merge one layer to ``kv_heads`` with post-RoPE key projection; float64 throughout.

    ``stats`` must hold rotated key/query moments (RotatedStatsCollector). Without them
    (``mean``, ``svd-weights``) the weights' own moments stand in, ignoring the rotation.
    """
    if method == "svd-weights" or stats is None:
        stats = weight_stats(w.wq, w.bq, w.wk, w.bk, w.wv, w.bv, shape.num_heads)
    kv, d, n_rep = shape.num_kv_heads, shape.head_dim, shape.n_rep
    met_v = objective_metrics("v", objective, kv, d, n_rep, wo=w.wo)
    met_k = objective_metrics("k", objective, kv, d, n_rep, q_moments=stats.q)

    def solve_k(g: tuple[int, ...]) -> Merge:
        return solve_real(stats.k, g, met_k, d, method)

    def solve_v(g: tuple[int, ...]) -> Merge:
        return solve_real(stats.v, g, met_v, d, method)

    groups = choose_groups(grouping, kv, kv_heads, solve_k, solve_v, seed)
    key_merges = [solve_k(g) for g in groups]
    value_merges = [solve_v(g) for g in groups]
    folded = fold_layer(w, [_passthrough(g, d, w.wq) for g in groups], value_merges, *_dims(shape))
    order = [j for g in groups for j in g]  # k_proj keeps every old head, in group order
    folded.wk = torch.cat([w.wk[j * d : (j + 1) * d] for j in order])
    if w.bk is not None:
        folded.bk = torch.cat([w.bk[j * d : (j + 1) * d] for j in order])
    query_down = [
        km.dec_block(p).T for km in key_merges for p in range(len(km.members)) for _ in range(n_rep)
    ]
    return ProjectedLayerResult(
        weights=folded,
        groups=groups,
        key_merges=key_merges,
        value_merges=value_merges,
        key_down=torch.stack([km.enc for km in key_merges]),
        query_down=torch.stack(query_down),
        key_heads=kv,
    )


def _dims(shape: LayerShape) -> tuple[int, int, int]:
    return shape.num_heads, shape.num_kv_heads, shape.head_dim
