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


@contextlib.contextmanager
def capture(
    attention: torch.nn.Module, store: torch.device | None = None
) -> Iterator[AttentionSamples]:
    """Record the inputs and outputs of ``attention``'s forward calls (``store``: where)."""
    got = AttentionSamples()

    def put(t: Any) -> Any:
        return t.detach().to(store) if isinstance(t, torch.Tensor) and store is not None else t

    def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        got.kwargs.append(
            {
                "hidden_states": put(x),
                "position_embeddings": None if pe is None else tuple(put(t) for t in pe),
                "attention_mask": put(kwargs.get("attention_mask")),
            }
        )
        got.outputs.append(put(out[0] if isinstance(out, tuple) else out))

    handle = attention.register_forward_hook(hook, with_kwargs=True)
    try:
        yield got
    finally:
        handle.remove()
