"""Solve one group merge: t old KV heads -> 1 new head, as an encoder/decoder pair.

Every method produces the same shape of answer, in column-vector convention for the group's
stacked activations x = [x_1; ...; x_t] (t*d):

    new head   y     = enc @ x            enc: (d, t*d)
    old head j x_j  ~= dec_j @ y          dec: (t*d, d), dec_j its j-th (d, d) block

so folding (fold.py) never needs to know which method ran. Methods:

- ``mean``: y = mean of the group, x_j ~= y (the GQA paper's mean-pooling baseline).
- ``svd`` / ``svd-weights``: the best rank-d reconstruction under the objective metric,
  from activation second moments (svd) or from the weights' (W W^T, svd-weights).

Keys under RoPE use the per-frequency complex form (docs/methods.md, "--rope-keys"): each RoPE
pair is one complex number, the group is merged by a rank-1 complex PCA per frequency, and
enc/dec blocks are 2x2 rotation-and-scale matrices, which commute with the rotation. Dims
outside the rotary part (partial rotary) get the real solve.

The objective metric M_j (d x d per old head) weighs reconstruction errors by what reads
them: o_proj for values, the queries' second moment for keys (``--objective output``), or
the identity (``--objective plain``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .names import METHODS as METHODS  # the names, beside the code they name


@dataclass
class Merge:
    """The solution for one group of old KV heads."""

    members: tuple[int, ...]
    enc: torch.Tensor  # (d, t*d)
    dec: torch.Tensor  # (t*d, d)
    error: float  # residual energy of the reconstruction, in the objective metric
    total: float  # energy of the group's activations, in the same metric

    def dec_block(self, p: int) -> torch.Tensor:
        """Decoder of the group's p-th member: x_p ~= dec_block(p) @ y."""
        d = self.enc.shape[0]
        return self.dec[p * d : (p + 1) * d]


def objective_metrics(
    kind: str,
    objective: str,
    num_kv_heads: int,
    head_dim: int,
    n_rep: int,
    wo: torch.Tensor | None = None,
    q_moments: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per old KV head, the (d x d) metric M_j in which its reconstruction error is measured.

    values, output objective: sum over query heads h reading j of W_o[:, h]^T W_o[:, h]
    keys, output objective:   sum over query heads h reading j of E[q_h q_h^T]
    plain objective:          identity

    Metrics are scaled by one layer-wide constant (mean trace = d): this does not move any
    optimum, keeps numbers O(1), and keeps group costs comparable within a layer.
    """
    d = head_dim
    eye = torch.eye(d, dtype=torch.float64, device=_device(wo, q_moments))
    if objective == "plain":
        return [eye.clone() for _ in range(num_kv_heads)]
    if objective != "output":
        raise ValueError(f"unknown objective {objective!r}")
    mets = []
    for j in range(num_kv_heads):
        heads = range(j * n_rep, (j + 1) * n_rep)
        if kind == "v":
            m = sum(wo[:, h * d : (h + 1) * d].T @ wo[:, h * d : (h + 1) * d] for h in heads)
        else:
            m = sum(q_moments[h] for h in heads)
        mets.append(0.5 * (m + m.T))
    scale = sum(float(torch.trace(m)) for m in mets) / (num_kv_heads * d)
    if scale <= 0:
        return [eye.clone() for _ in range(num_kv_heads)]
    return [m / scale + 1e-8 * eye for m in mets]


def _device(*ts: torch.Tensor | None) -> torch.device:
    for t in ts:
        if t is not None:
            return t.device
    return torch.device("cpu")


def _sqrt_and_inv(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square roots of a batch (b, n, n) of PSD matrices and their inverses.

    One batched eigh instead of one call per matrix; eigenvalues are floored per matrix.
    """
    lam, u = torch.linalg.eigh(m)
    lam = lam.clamp_min(lam.amax(-1, keepdim=True).clamp_min(1e-30) * 1e-10)
    s = lam.sqrt().unsqueeze(-2)
    ut = u.transpose(-1, -2)
    return (u * s) @ ut, (u / s) @ ut


def _fix_signs(q: torch.Tensor) -> torch.Tensor:
    """Eigenvectors with their largest entry positive.

    eigh returns each column up to sign, and the sign differs between LAPACK and cuSOLVER:
    either is the same model (enc and dec flip together), but a fixed convention makes the
    weights written on a CPU and on a GPU agree.
    """
    cols = torch.arange(q.shape[1], device=q.device)
    signs = torch.sign(q[q.abs().argmax(dim=0), cols])
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*blocks)


def _residual(
    enc: torch.Tensor, dec: torch.Tensor, c: torch.Tensor, s: torch.Tensor
) -> tuple[float, float]:
    """(error, total) of x ~= dec @ enc @ x in the metric s (= M^(1/2)), second moment c."""
    r = torch.eye(c.shape[0], dtype=c.dtype, device=c.device) - dec @ enc
    err = torch.trace(s @ r @ c @ r.T @ s)
    tot = torch.trace(s @ c @ s)
    return float(err.real), float(tot.real)


def solve_real(
    c_layer: torch.Tensor,
    members: tuple[int, ...],
    metrics: list[torch.Tensor],
    head_dim: int,
    method: str,
    dims: list[int] | None = None,
) -> Merge:
    """Real merge of ``members`` over head dims ``dims`` (default all): enc (m, t*m), dec.

    svd: whiten each head by S_j = M_j^(1/2), take the top eigenvectors Q of the whitened
    second moment, map back: enc = Q^T S, dec = S^-1 Q (methods.md 1.1-1.2).
    """
    d = head_dim
    dims = list(range(d)) if dims is None else dims
    m, t = len(dims), len(members)
    idx = torch.tensor([j * d + k for j in members for k in dims], device=c_layer.device)
    cg = c_layer[idx][:, idx]
    sq, inv = _sqrt_and_inv(torch.stack([metrics[j][dims][:, dims] for j in members]))
    s, s_inv = _block_diag(list(sq)), _block_diag(list(inv))
    if method == "mean":
        eye = torch.eye(m, dtype=cg.dtype, device=cg.device)
        enc = torch.cat([eye / t] * t, dim=1)
        dec = torch.cat([eye] * t, dim=0)
    else:
        _, vecs = torch.linalg.eigh(s @ cg @ s)
        q = _fix_signs(vecs[:, -m:])
        enc = q.T @ s
        dec = s_inv @ q
    err, tot = _residual(enc, dec, cg, s)
    return Merge(tuple(members), enc, dec, err, tot)


def solve_rope(
    c_layer: torch.Tensor,
    members: tuple[int, ...],
    metrics: list[torch.Tensor],
    head_dim: int,
    method: str,
    pairs: list[tuple[int, int]],
) -> Merge:
    """RoPE-commuting key merge: per frequency pair, a complex rank-1 merge of the group.

    With kappa_j = x_j[a] + i x_j[b] and weights w_j (RMS of the reading queries' pair):
    take the top eigenvector u of diag(w) E[kappa kappa^H] diag(w); then
    y = sum_j conj(u_j) w_j kappa_j and kappa_j ~= (u_j / w_j) y. Multiplying by a complex
    scalar commutes with RoPE's rotation, so the decoder folds exactly into q_proj.
    Dims outside ``pairs`` (partial rotary) are merged by :func:`solve_real`.
    """
    d, t = head_dim, len(members)
    dev, dt = c_layer.device, c_layer.dtype
    enc = torch.zeros(d, t * d, dtype=dt, device=dev)
    dec = torch.zeros(t * d, d, dtype=dt, device=dev)
    err_total, tot_total = 0.0, 0.0
    if pairs:
        a = torch.tensor([p[0] for p in pairs], device=dev)  # (F,)
        b = torch.tensor([p[1] for p in pairs], device=dev)
        offs = torch.tensor(members, device=dev) * d  # (t,)
        ia, ib = offs + a[:, None], offs + b[:, None]  # (F, t)

        def block(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return c_layer[r[:, :, None], c[:, None, :]]  # (F, t, t)

        # E[kappa_j conj(kappa_l)] per frequency, kappa = x[a] + i x[b]
        herm = torch.complex(block(ia, ia) + block(ib, ib), block(ib, ia) - block(ia, ib))
        met = torch.stack([metrics[j] for j in members])  # (t, d, d)
        w = (met[:, a, a] + met[:, b, b]).T.clamp_min(0).sqrt()  # (F, t)
        w = w.clamp_min(float(w.max().clamp_min(1e-30)) * 1e-6)
        wc = w.to(torch.complex128)
        whiten = wc[:, :, None] * herm * wc[:, None, :]
        if method == "mean":
            cc = torch.full_like(wc, 1.0 / t)
            dd = torch.ones_like(wc)
        else:
            _, vecs = torch.linalg.eigh(whiten)
            u = vecs[..., -1]  # (F, t), top eigenvector per frequency
            # eigh leaves each frequency's phase arbitrary; fix it so that the encoder's sum
            # is real positive: one member (identity) then gets enc = dec = 1, not a rotation.
            s = (u.conj() * wc).sum(dim=1, keepdim=True)
            u = u * (s / s.abs().clamp_min(1e-300))
            cc, dd = u.conj() * wc, u / wc
            scale = (t**0.5) / torch.linalg.vector_norm(dd, dim=1, keepdim=True)
            dd, cc = dd * scale, cc / scale  # mean-like gain: |dec| ~ 1
        eye = torch.eye(t, dtype=torch.complex128, device=dev)
        r = eye - dd[:, :, None] * cc[:, None, :]
        wr = wc[:, :, None] * r
        err_total = float(torch.einsum("fij,fjk,fik->", wr, herm, wr.conj()).real)
        tot_total = float(torch.diagonal(whiten, dim1=1, dim2=2).sum().real)
        rows_a, rows_b = a[:, None].expand(-1, t), b[:, None].expand(-1, t)
        local = torch.arange(t, device=dev) * d  # member p's offset inside the group
        la, lb = local + a[:, None], local + b[:, None]
        cr, ci, dr, di = cc.real, cc.imag, dd.real, dd.imag
        enc[rows_a, la], enc[rows_a, lb], enc[rows_b, la], enc[rows_b, lb] = cr, -ci, ci, cr
        dec[la, rows_a], dec[la, rows_b], dec[lb, rows_a], dec[lb, rows_b] = dr, -di, di, dr
    rotary = {i for pr in pairs for i in pr}
    rest = [k for k in range(d) if k not in rotary]
    if rest:
        sub = solve_real(c_layer, members, metrics, d, method, dims=rest)
        m, rt = len(rest), torch.tensor(rest, device=dev)
        for p in range(t):
            enc[rt[:, None], p * d + rt[None, :]] = sub.enc[:, p * m : (p + 1) * m]
            dec[p * d + rt[:, None], rt[None, :]] = sub.dec[p * m : (p + 1) * m]
        err_total += sub.error
        tot_total += sub.total
    return Merge(tuple(members), enc, dec, err_total, tot_total)
