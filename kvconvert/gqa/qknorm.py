"""Merging keys through a per-head q/k RMSNorm (Qwen3): an approximation, exact at identity.

In such a layer attention reads q^ = g_q * n(W_q x) and k^ = g_k * n(W_k x), where n(z) =
z / rms(z) per head and g_q, g_k are ONE weight vector each, shared by all heads of the layer.
The merge is solved on what RoPE sees (the post-norm k^, see calibration/stats.py): new key
y = enc k^_group, old key k^_j ~= dec_j y, and query h reading j becomes dec_j^T q^_h. The norm
is not linear, so these are realised as follows (D = diag(g), rho_j = RMS of raw key head j):

    new k_proj rows    = D_k^-1 enc blockdiag(D_k / rho_j) W_k,group
    new q_proj rows h  = D_q^-1 dec_j^T D_q W_q,h
    new norm weights   = c_k g_k, c_q g_q

The DIRECTION of every new key and query is then exact up to one approximation: a member's
own per-token rms(k_j) is replaced by its calibration average rho_j inside the merged head
(the new head has one norm, not one per member). The norm still rescales each new vector to
unit RMS, which removes the merge's per-token gain; c_k and c_q put back its average (the
ratio of the merged to the original heads' post-norm energy in the calibration moments), one
scalar per layer because the norm weights are shared by all heads. With one member per group
(identity) enc and dec are the identity (solve.py fixes the phase), so c = 1 and the layer is
reproduced exactly. tests/arch measure the approximation on a tiny Qwen3 with non-trivial
norm weights.
"""

from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from .solve import Merge


def _safe(g: torch.Tensor) -> torch.Tensor:
    """g with entries near zero pushed away from it (its inverse is used)."""
    floor = float(g.abs().max().clamp_min(1e-30)) * 1e-6
    sign = torch.where(g < 0, -1.0, 1.0).to(g)
    return torch.where(g.abs() < floor, sign * floor, g)


def normed_weight_stats(
    raw: LayerStats, q_norm: torch.Tensor, k_norm: torch.Tensor, num_kv: int, head_dim: int
) -> LayerStats:
    """Post-norm moments from raw (weight) moments: each head scaled to unit RMS, then by g."""
    d = head_dim
    k_ms = torch.stack(
        [torch.trace(raw.k[j * d : (j + 1) * d, j * d : (j + 1) * d]) / d for j in range(num_kv)]
    )
    s = k_norm.repeat(num_kv) / k_ms.clamp_min(1e-30).sqrt().repeat_interleave(d)
    k = s[:, None] * raw.k * s[None, :]
    q_ms = torch.diagonal(raw.q, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # (H,)
    q = q_norm[None, :, None] * raw.q * q_norm[None, None, :] / q_ms[:, None, None]
    return LayerStats(k=k, v=raw.v, q=q, count=raw.count, k_ms=k_ms)


def through_norms(
    key_merges: list[Merge],
    stats: LayerStats,
    q_norm: torch.Tensor,
    k_norm: torch.Tensor,
    n_rep: int,
    head_dim: int,
) -> tuple[list[Merge], torch.Tensor, torch.Tensor]:
    """Key merges to fold into the raw projections, and the new (q_norm, k_norm) weights."""
    d = head_dim
    gq, gk = _safe(q_norm), _safe(k_norm)
    rho = stats.k_ms.clamp_min(1e-30).sqrt()
    out: list[Merge] = []
    e_new, e_old, q_new, q_old = 0.0, 0.0, 0.0, 0.0
    for m in key_merges:
        t = len(m.members)
        # blockdiag(D_k / rho_j); only ratios of rho matter (the norm removes a common
        # scale), so divide by the group's geometric mean: one member is left unscaled.
        ref = rho[list(m.members)].log().mean().exp()
        col = torch.cat([gk * (ref / rho[j]) for j in m.members])
        enc = (m.enc / gk[:, None]) * col[None, :]
        dec = gq.repeat(t)[:, None] * m.dec / gq[None, :]
        out.append(Merge(m.members, enc, dec, m.error, m.total))
        idx = torch.cat([torch.arange(j * d, (j + 1) * d) for j in m.members]).to(stats.k.device)
        cg = stats.k[idx][:, idx]
        e = m.enc / gk[:, None]
        e_new += float(torch.trace(e @ cg @ e.T))
        for p, j in enumerate(m.members):
            cj = stats.k[j * d : (j + 1) * d, j * d : (j + 1) * d]
            e_old += float(torch.trace(cj / gk[:, None] / gk[None, :]))
            mq = m.dec_block(p).T / gq[:, None]  # D_q^-1 dec_j^T: new query over its norm weight
            for h in range(j * n_rep, (j + 1) * n_rep):
                q_new += float(torch.trace(mq @ stats.q[h] @ mq.T))
                q_old += float((torch.diagonal(stats.q[h]) / gq**2).sum())
    num_kv = sum(len(m.members) for m in key_merges)
    c_k = (e_new / len(key_merges)) / max(e_old / num_kv, 1e-300)
    c_q = q_new / max(q_old, 1e-300)
    return out, q_norm * c_q**0.5, k_norm * c_k**0.5
