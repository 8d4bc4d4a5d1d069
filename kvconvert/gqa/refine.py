"""Refine a merged layer: fit its attention to the original's outputs on calibration data.

The closed-form merge (solve.py) reconstructs keys and values one at a time in a linear
metric, but attention reads keys through a softmax and values through attention weights
that are far from uniform (sink tokens take much of them). Starting from the merge, a few
Adam steps on the layer's own relative output error

    || attn'(x) - attn(x) ||^2 / || attn(x) ||^2

over the calibration activations x that reach the layer recover much of what the linear
metric misses (docs/methods.md, "--refine-steps"). Only that layer's attention trains, on
the activations the conversion already computes, so the cost is about ``steps`` forward and
backward passes of one attention module over one calibration batch per merged layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..calibration.samples import AttentionSamples
from ..distributed import sum_over_ranks

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


def _on(t: Any, device: torch.device) -> Any:
    if isinstance(t, tuple):
        return tuple(_on(x, device) for x in t)
    return t.to(device) if isinstance(t, torch.Tensor) else t


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


@dataclass
class Refined:
    """A refinement's result: the trained tensors by role, and the relative output error."""

    tensors: dict[str, torch.Tensor]
    before: float
    after: float


def refine(
    module: torch.nn.Module,
    samples: AttentionSamples,
    steps: int,
    lr: float,
    world: int = 1,
) -> Refined:
    """Train ``module`` (a merged attention, any dtype) to reproduce ``samples.outputs``.

    ``lr`` is relative: each tensor's peak Adam step is ``lr`` times its RMS. Float32
    throughout; a cosine decay from the peak to 0; step s uses batch s mod the number
    of batches (under torchrun, wherever it is: the run equals one process's).
    If the fit ends worse on the calibration data than it started (a too-high --refine-lr),
    the merge is kept as solved.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _refine(module, samples, steps, lr, world)


def _refine(
    module: torch.nn.Module, samples: AttentionSamples, steps: int, lr: float, world: int
) -> Refined:
    device = next(module.parameters()).device
    _trainable_copy(module)
    work = module.eval()  # eval: no dropout; gradients still flow
    params = {n: p for n, p in work.named_parameters() if role(n) is not None}
    start = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    # the samples stay where the engine keeps them (--offload-activations: the CPU); each
    # step moves its batch to the module's device
    batches = [{k: _fresh(v) for k, v in kw.items()} for kw in samples.kwargs]
    targets = [_fresh(y) for y in samples.outputs]

    def loss(j: int) -> torch.Tensor:
        out = work(**{k: _on(v, device) for k, v in batches[j].items()})
        out = out[0] if isinstance(out, tuple) else out
        y = targets[j].to(device)
        return (out - y).square().sum() / y.square().sum().clamp_min(1e-30)

    def mean_loss() -> float:
        with torch.no_grad():
            total = sum((loss(j) for j in range(len(targets))), torch.zeros((), device=device))
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
        if owner == rank:
            loss(local).backward()
        if world > 1:
            for p in params.values():
                p.grad = sum_over_ranks(
                    p.grad if p.grad is not None else torch.zeros_like(p), world
                )
        opt.step()
    after = mean_loss()
    if not after <= before:  # also catches NaN
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        after = before
    for p in params.values():
        p.requires_grad_(False)
    return Refined({role(n): p.detach() for n, p in params.items()}, before, after)
