"""Refine a merged layer: fit its attention to the original's outputs on calibration data.

The closed-form merge (solve.py) reconstructs keys and values one at a time in a linear
metric, but attention reads keys through a softmax and values through attention weights
that are far from uniform (sink tokens take much of them). Starting from the merge, a few
Adam steps on the layer's own relative output error

    || attn'(x) - attn(x) ||^2 / || attn(x) ||^2

over the calibration activations x that reach the layer recover much of what the linear
metric misses (docs/methods.md, "--refine-steps"). Only that layer's attention trains, on
the activations the conversion already computes. Each step fits one calibration batch at a
random sample of query positions (``--refine-rows``; keys and values at every position), so
a step costs about rows / seq_len of a forward and backward pass of the attention module
over that batch.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers.models.llama.modeling_llama import rotate_half

from ..calibration.data import batches
from ..calibration.samples import AttentionSamples, capture
from ..distributed import sum_over_ranks
from ..source import Source

#: Tensors the refinement trains, by module-relative name, and their AttentionWeights role.
#: A run-time key projection (``--rope-keys project``: key_down/query_down) stays as solved.
_TRAINED = re.compile(r"^(?:([qkvo])_proj\.(weight|bias)|([qk]_norm)\.weight)$")


def role(name: str) -> str | None:
    """AttentionWeights role ("q.weight", "k_norm.weight", ...) of a module parameter name."""
    m = _TRAINED.match(name)
    if m is None:
        return None
    return f"{m[1]}.{m[2]}" if m[1] else f"{m[3]}.weight"


#: Default peak Adam step as a fraction of each trained tensor's RMS: weights of different
#: widths and roles (SmolLM2's q_proj RMS 0.25, v_proj 0.12) move by the same relative
#: amount. Measured on stories260K and SmolLM2 (docs/methods.md, "--refine-steps").
DEFAULT_LR = 0.02

#: Query positions per sequence that one Adam step fits by default (``--refine-rows``),
#: drawn at random for each step; their keys and values are every position up to them. On
#: SmolLM2 (3 -> 1 KV heads) 64 of 256 cut the conversion from 10.4x to 3.0x the time of
#: ``--refine-steps 0`` for KL 0.673 instead of 0.653 (docs/scale.md, "Refinement's cost").
STEP_ROWS = 64
#: Query positions per sequence, fixed for the run, on which the error before and after the
#: fit is measured (every calibration sequence): the check that keeps the merge as solved
#: when the fit did not help, and the ``refine_error`` the report gives.
CHECK_ROWS = 64


def _scale(name: str, params: dict[str, torch.nn.Parameter]) -> float:
    """The RMS that sets a tensor's step: its own; a bias takes its weight's (it may be 0)."""
    ref = params.get(name.replace(".bias", ".weight"), params[name])
    return float(ref.detach().square().mean().sqrt().clamp_min(1e-8))


def _fresh(t: Any, device: torch.device | None = None) -> Any:
    """A float32 copy (on ``device``, else where ``t`` is) made outside inference mode, so
    autograd may use it."""
    if isinstance(t, tuple):
        return tuple(_fresh(x, device) for x in t)
    if isinstance(t, torch.Tensor):
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        return t.to(device=device or t.device, dtype=dtype, copy=True)
    return t


def _trainable_copy(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer of ``module`` by a float32 copy, in place: a module
    built under ``torch.inference_mode`` (the engines run there) holds inference tensors,
    which autograd refuses."""
    device = next(module.parameters()).device
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = torch.nn.Parameter(_fresh(p.detach(), device), False)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = _fresh(b, device)


class Runs(NamedTuple):
    """Where and how a module's attention runs: what a merged copy of it needs."""

    impl: str | None
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, attention: torch.nn.Module) -> Runs:
        weight = next(attention.parameters())
        config = getattr(attention, "config", None)
        return cls(getattr(config, "_attn_implementation", None), weight.device, weight.dtype)


@dataclass
class Refined:
    """A refinement's result: the trained tensors by role (none where the fit did not help:
    the merge stays as solved), and the relative output error before and after."""

    tensors: dict[str, torch.Tensor]
    before: float
    after: float


def refine(
    module: torch.nn.Module,
    samples: AttentionSamples,
    steps: int,
    lr: float,
    world: int = 1,
    rows: int = STEP_ROWS,
) -> Refined:
    """Train ``module`` (a merged attention, any dtype) to reproduce ``samples.outputs``.

    Each step fits one calibration batch at ``rows`` random query positions per sequence
    (0: every position).
    ``lr`` is relative: each tensor's peak Adam step is ``lr`` times its RMS. Float32
    throughout; a cosine decay from the peak to 0; step s uses batch s mod the number
    of batches (under torchrun, wherever it is: the run equals one process's).
    If the fit ends worse on the calibration data than it started (a too-high --refine-lr),
    the merge is kept as solved.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _refine(module, samples, steps, lr, world, rows)


def rows_output(attn: torch.nn.Module, kwargs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """``attn``'s output (a KVConvertAttention) at query positions ``rows`` only, each query
    attending to its own position and the ones before it (within ``attn.sliding_window``):
    the rows of ``attn(**kwargs)[0]`` for calibration sequences, which have no padding, at
    ``len(rows) / T`` of the query-side cost. Keys and values are computed for every position
    (``tests/gqa/test_refine.py`` checks it against the module's own forward)."""
    x = kwargs["hidden_states"]
    cos, sin = kwargs["position_embeddings"]
    b, t, _ = x.shape
    d, h = attn.head_dim, attn.config.num_attention_heads
    q = attn.q_proj(x[:, rows]).view(b, len(rows), h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, d).transpose(1, 2)
    q = q * cos[:, rows].unsqueeze(1) + rotate_half(q) * sin[:, rows].unsqueeze(1)
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    g = attn.num_kv_heads
    if attn.projected:  # --rope-keys project: the rotated keys and queries projected per head
        k = k.view(b, g, -1, t, d).transpose(2, 3).reshape(b, g, t, -1)
        k = torch.einsum("bgsx,gex->bgse", k, attn.key_down)
        q = torch.einsum("bhsd,hed->bhse", q, attn.query_down)
    q = q.reshape(b, g, h // g * len(rows), k.shape[-1])  # the query heads of each KV head
    pos = torch.arange(t, device=x.device)
    allowed = pos[None, :] <= rows[:, None]
    if attn.sliding_window is not None:
        allowed &= pos[None, :] > rows[:, None] - attn.sliding_window
    mask = allowed.repeat(h // g, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=attn.scaling
    )
    out = out.reshape(b, h, len(rows), d).transpose(1, 2).reshape(b, len(rows), h * d)
    return attn.o_proj(out)


def _refine(
    module: torch.nn.Module,
    samples: AttentionSamples,
    steps: int,
    lr: float,
    world: int,
    step_rows: int,
) -> Refined:
    device = next(module.parameters()).device
    _trainable_copy(module)
    work = module.eval()  # eval: no dropout; gradients still flow
    params = {n: p for n, p in work.named_parameters() if role(n) is not None}
    for p in params.values():
        p.requires_grad_(True)
    # the samples stay where and as the engine keeps them (--offload-activations: the CPU;
    # the compute dtype): each step takes a float32 copy of the batch it reads, on the
    # module's device, so the refinement holds one batch's copy, not all of them
    targets = samples.outputs
    seq_len = targets[0].shape[1] if targets else 1  # a rank may hold no batch (torchrun)
    gen = torch.Generator().manual_seed(0)  # the same draws on every run and rank
    check = _draw_rows(gen, seq_len, CHECK_ROWS).to(device)

    def loss(j: int, rows: torch.Tensor) -> torch.Tensor:
        kw = {k: _fresh(v, device) for k, v in samples.kwargs[j].items()}
        out = rows_output(work, kw, rows)
        y = _fresh(targets[j][:, rows.to(targets[j].device)], device)
        return (out - y).square().sum() / y.square().sum().clamp_min(1e-30)

    def mean_loss() -> float:
        with torch.no_grad():
            total = sum(
                (loss(j, check) for j in range(len(targets))), torch.zeros((), device=device)
            )
        both = sum_over_ranks(
            torch.stack([total, torch.tensor(float(len(targets)), device=device)]), world
        )
        return float(both[0] / both[1])

    before = mean_loss()
    peaks = [lr * _scale(n, params) for n in params]
    opt = torch.optim.Adam(
        [{"params": [p], "lr": a} for p, a in zip(params.values(), peaks, strict=True)]
    )
    # Under torchrun rank r holds the calibration batches r, r + W, ...: step s reads batch
    # s mod (all batches) on whichever rank holds it and the others add zero gradients, so
    # the steps are those of one process.
    rank = torch.distributed.get_rank() if world > 1 else 0
    total = int(sum_over_ranks(torch.tensor(float(len(targets)), device=device), world))
    for s in range(steps):
        for g, peak in zip(opt.param_groups, peaks, strict=True):
            g["lr"] = peak * 0.5 * (1 + math.cos(math.pi * s / steps))
        opt.zero_grad(set_to_none=False)
        owner, local = (s % total) % world, (s % total) // world
        rows = _draw_rows(gen, seq_len, step_rows or seq_len).to(device)  # alike on all ranks
        if owner == rank:
            loss(local, rows).backward()
        if world > 1:
            for p in params.values():
                p.grad = sum_over_ranks(
                    p.grad if p.grad is not None else torch.zeros_like(p), world
                )
        opt.step()
    after = mean_loss()
    del opt  # its moments, before the tensors are handed back
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    if not after <= before:  # also catches NaN: the caller keeps the merge as solved
        return Refined({}, before, before)
    return Refined({role(n): p.detach() for n, p in params.items()}, before, after)


def arithmetic_share(
    config: dict[str, Any],
    kv_heads: list[int],
    tokens: int,
    seq_len: int,
    batch_size: int,
    steps: int,
    rows: int,
) -> float:
    """The refinement's share of a conversion's arithmetic (multiply-adds), for --dry-run.

    A layer's calibration forward: its projections and MLP over every token, plus causal
    attention. A refinement step (forward and backward: 3 forwards' worth) over one batch:
    q/o and the attention at ``rows`` query positions per sequence, k/v at every position;
    plus the before/after check at CHECK_ROWS positions of every sequence. On SmolLM2 this
    says 75% where 67% of the wall time was measured, on the 1.55B layer shapes 90% for 85%
    (docs/scale.md, "Refinement's cost"); per-step overhead is not counted.
    """
    hid = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    d = int(config.get("head_dim") or hid // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    inter = int(config.get("intermediate_size") or 4 * hid)
    qo, t = 2 * hid * heads * d, seq_len
    r = min(rows or t, t)
    forward = sum(
        2 * tokens * (qo + 2 * hid * kv * d + 3 * hid * inter) + 2 * tokens * t * heads * d
        for _ in kv_heads
    )
    refine = 0.0
    for g in kv_heads:
        if g >= kv or steps == 0:
            continue  # an unmerged layer is not refined
        kvp = 2 * hid * g * d

        def passes(seqs: int, q_rows: int, kvp: int = kvp) -> float:
            return 2 * seqs * (q_rows * qo + t * kvp + q_rows * t * heads * d)

        refine += steps * 3 * passes(batch_size, r)
        refine += 2 * passes(tokens // t, min(CHECK_ROWS, t))
    return refine / (forward + refine) if refine else 0.0


def _draw_rows(gen: torch.Generator, seq_len: int, n: int) -> torch.Tensor:
    """``n`` distinct query positions of ``seq_len`` (all of them when ``n >= seq_len``)."""
    if n >= seq_len:
        return torch.arange(seq_len)
    return torch.randperm(seq_len, generator=gen)[:n].sort().values


@torch.no_grad()
def refine_on_model(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    src: Source,
    todo: list[int],
    batch_size: int,
    fit: Callable[[int, AttentionSamples, torch.nn.Module], Refined],
    progress: bool,
) -> dict[int, Refined]:
    """Refine the layers ``todo`` of a loaded model (the whole-model engine): ``fit(i,
    samples, attention)`` merges and fits layer ``i`` on what its original attention saw.

    The calibration batches are pushed through the decoder layers one layer at a time (each
    layer gets the keyword arguments the model's own forward gave it: masks differ between
    sliding and full layers), so memory holds one layer's activations, not all.
    """
    device = next(model.parameters()).device
    paths = [src.attention_path(i).rsplit(".", 1)[0] for i in range(todo[-1] + 1)]
    layers = [model.get_submodule(p) for p in paths]  # the decoder layers up to the last
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]

    def grab(i: int) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, args: tuple, kw: dict) -> None:
            x = args[0] if args else kw["hidden_states"]
            if i == 0:
                hidden.append(x)
            kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if i == len(layers) - 1:
                raise _Enough

        return hook

    pre = [m.register_forward_pre_hook(grab(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        for batch in batches(tokens, batch_size):
            with contextlib.suppress(_Enough):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in pre:
            h.remove()
    refined: dict[int, Refined] = {}
    bar = tqdm(total=len(todo), desc="refining layers", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        attn = model.get_submodule(src.attention_path(i))
        with capture(attn) as samples:
            outs = [_hidden(layer(h, **kw)) for h, kw in zip(hidden, kwargs[i], strict=True)]
        if i in todo:
            with torch.enable_grad():
                refined[i] = fit(i, samples, attn)
            bar.update(1)
        hidden = outs
    bar.close()
    return refined


class _Enough(Exception):
    """Raised by a hook once the layers to refine have their inputs: ends the forward."""


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
