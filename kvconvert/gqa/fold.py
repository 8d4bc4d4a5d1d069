"""Apply group merges to one layer's q/k/v/o weights (methods.md 1.1-1.4).

Given, per new KV head g, a key merge and a value merge of the same old heads:

    k_proj rows of g  = enc_k @ stacked k_proj rows of the members   (biases likewise)
    v_proj rows of g  = enc_v @ stacked v_proj rows of the members
    q_proj rows of h  <- dec_k,j^T @ q_proj rows of h     for each query head h reading j
    o_proj cols of h  <- o_proj cols of h @ dec_v,j

Query heads are reordered so that new head g serves a contiguous block of them (needed when
the grouping is not adjacent); the reorder is applied consistently to q_proj and o_proj, so
the layer's output is unchanged by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .solve import Merge


@dataclass
class AttentionWeights:
    """One layer's attention projections (torch Linear layout: out_features x in_features)."""

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    #: per-head q/k RMSNorm weights (d,), shared by all heads of the layer (Qwen3); else None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    def items(self) -> dict[str, torch.Tensor | None]:
        out = {
            "q.weight": self.wq,
            "k.weight": self.wk,
            "v.weight": self.wv,
            "o.weight": self.wo,
            "q.bias": self.bq,
            "k.bias": self.bk,
            "v.bias": self.bv,
            "o.bias": self.bo,
        }
        if self.k_norm is not None:
            out.update({"q_norm.weight": self.q_norm, "k_norm.weight": self.k_norm})
        return out

    @classmethod
    def from_items(cls, items: dict[str, torch.Tensor | None]) -> AttentionWeights:
        """Inverse of :meth:`items` (missing roles are None)."""
        g = items.get
        return cls(
            wq=g("q.weight"),
            wk=g("k.weight"),
            wv=g("v.weight"),
            wo=g("o.weight"),
            bq=g("q.bias"),
            bk=g("k.bias"),
            bv=g("v.bias"),
            bo=g("o.bias"),
            q_norm=g("q_norm.weight"),
            k_norm=g("k_norm.weight"),
        )


def query_order(groups: list[tuple[int, ...]], n_rep: int) -> list[int]:
    """Old query-head index for each new query-head position."""
    return [h for g in groups for j in g for h in range(j * n_rep, (j + 1) * n_rep)]


def fold_layer(
    w: AttentionWeights,
    key_merges: list[Merge],
    value_merges: list[Merge],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> AttentionWeights:
    """New weights for ``len(key_merges)`` KV heads; float64 in, float64 out."""
    d, n_rep = head_dim, num_heads // num_kv_heads
    groups = [m.members for m in key_merges]
    assert groups == [m.members for m in value_merges], "keys and values must share groups"

    def rows(t: torch.Tensor | None, heads: tuple[int, ...]) -> torch.Tensor | None:
        if t is None:
            return None
        return torch.cat([t[j * d : (j + 1) * d] for j in heads], dim=0)

    wq, wo = torch.empty_like(w.wq), torch.empty_like(w.wo)
    bq = torch.empty_like(w.bq) if w.bq is not None else None
    wk, wv, bk, bv = [], [], [], []
    new_h = 0
    for km, vm in zip(key_merges, value_merges, strict=True):
        wk.append(km.enc @ rows(w.wk, km.members))
        wv.append(vm.enc @ rows(w.wv, vm.members))
        if w.bk is not None:
            bk.append(km.enc @ rows(w.bk, km.members))
        if w.bv is not None:
            bv.append(vm.enc @ rows(w.bv, vm.members))
        for p, j in enumerate(km.members):
            dk, dv = km.dec_block(p), vm.dec_block(p)
            for h in range(j * n_rep, (j + 1) * n_rep):
                sl_new, sl_old = slice(new_h * d, (new_h + 1) * d), slice(h * d, (h + 1) * d)
                wq[sl_new] = dk.T @ w.wq[sl_old]
                if bq is not None:
                    bq[sl_new] = dk.T @ w.bq[sl_old]
                wo[:, sl_new] = w.wo[:, sl_old] @ dv
                new_h += 1
    return AttentionWeights(
        wq=wq,
        wk=torch.cat(wk),
        wv=torch.cat(wv),
        wo=wo,
        bq=bq,
        bk=torch.cat(bk) if bk else None,
        bv=torch.cat(bv) if bv else None,
        bo=w.bo,
        q_norm=w.q_norm,
        k_norm=w.k_norm,
    )
