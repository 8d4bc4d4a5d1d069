"""What one attention module reads and writes on the calibration data, batch by batch.

Refining a merged layer (gqa/refine.py) fits the merged attention to the original's outputs
on exactly these inputs; both engines record them with :func:`capture` while they run the
original layer anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionSamples:
    """What one attention module saw on the calibration data, batch by batch."""

    kwargs: list[dict[str, Any]] = field(default_factory=list)  # hidden_states, rope, mask
    outputs: list[torch.Tensor] = field(default_factory=list)  # its output per batch

    def join_last(self, n: int) -> None:
        """Join the last ``n`` forward calls into one batch (a batch run in pieces of whole
        sequences): the hidden states and outputs are concatenated along the batch dimension;
        what the pieces share (RoPE's cos and sin, a broadcast mask) is kept once."""
        if n <= 1 or len(self.outputs) < n:
            return
        kwargs, self.kwargs[-n:] = self.kwargs[-n:], []
        outputs, self.outputs[-n:] = self.outputs[-n:], []
        joined = {k: _shared_or_cat([kw[k] for kw in kwargs]) for k in kwargs[0]}
        joined["hidden_states"] = torch.cat([kw["hidden_states"] for kw in kwargs])
        self.kwargs.append(joined)
        self.outputs.append(torch.cat(outputs))


def _shared_or_cat(parts: list[Any]) -> Any:
    """One of equal pieces (RoPE's cos and sin: the same positions in every piece), else the
    pieces concatenated along the batch dimension; tuples part by part, None stays None."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_shared_or_cat(list(p)) for p in zip(*parts, strict=True))
    if all(p is first or (p.shape == first.shape and torch.equal(p, first)) for p in parts):
        return first
    return torch.cat(parts)


@contextlib.contextmanager
def capture(
    attention: torch.nn.Module,
    store: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[AttentionSamples]:
    """Record the inputs and outputs of ``attention``'s forward calls (``store``: where;
    ``dtype``: the hidden states' and outputs' dtype there, e.g. the checkpoint's 16-bit
    one where a CPU computes in float32: half the memory, within that dtype's rounding of
    what the checkpoint's own precision computes)."""
    got = AttentionSamples()

    def put(t: Any, cast: bool = False) -> Any:
        if not isinstance(t, torch.Tensor) or (store is None and not cast):
            return t
        to = dtype if cast and dtype is not None and t.is_floating_point() else t.dtype
        return t.detach().to(device=store or t.device, dtype=to)

    def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        got.kwargs.append(
            {
                "hidden_states": put(x, cast=True),
                "position_embeddings": None if pe is None else tuple(put(t) for t in pe),
                "attention_mask": put(kwargs.get("attention_mask")),
            }
        )
        got.outputs.append(put(out[0] if isinstance(out, tuple) else out, cast=True))

    handle = attention.register_forward_hook(hook, with_kwargs=True)
    try:
        yield got
    finally:
        handle.remove()
