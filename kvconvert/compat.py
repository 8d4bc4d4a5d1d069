"""The KV cache's name in the installed transformers, for kvconvert's own calls, and its size.

transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
``cache`` (the old name warns until its removal). kvconvert supports both sides of the rename
(docs/support.md), so it reads the name from public signatures instead of the version number.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import transformers
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

#: the transformers versions CI runs the output-loading tests under (``.ci/run``); the oldest
#: is the lower bound in pyproject.toml
OLDEST_TRANSFORMERS = "5.15.0"
NEWEST_TESTED_TRANSFORMERS = "5.24.0"

#: keyword of the cache in model forwards and mask builders: "cache" or "past_key_values"
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)
#: field of the cache in model outputs
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass a cache to a model forward or a mask builder."""
    return {CACHE_ARG: cache}


def output_cache(out: Any) -> Any:
    """The cache a forward returned (None when it returned none), under either field name."""
    for name in (CACHE_FIELD, "cache", "past_key_values"):
        if name in out:
            return out[name]
    return None


def stamp_config(config: dict[str, Any]) -> dict[str, Any]:
    """Record the transformers version an output's config.json is written with (a copied source
    config carries the version that saved the source)."""
    config["transformers_version"] = transformers.__version__
    return config


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor held by a cache's layers (each distinct tensor counted once).

    Works for ``DynamicCache`` and for custom caches whose layers hold other or differently
    sized tensors (e.g. PoD layers that keep values only), and for legacy tuple caches.
    0-dim tensors (counters such as a sliding layer's window size) are not cache storage.
    """
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0

    def add(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = (obj.data_ptr(), tuple(obj.shape))
            if obj.dim() and obj.numel() and key not in seen:  # 0-dim: bookkeeping scalars
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)) and depth < 3:
            for x in obj:
                add(x, depth + 1)
        elif isinstance(obj, dict) and depth < 3:
            for x in obj.values():
                add(x, depth + 1)

    layers = getattr(cache, "layers", None)
    if layers is None:  # legacy: tuple of (keys, values) per layer
        add(cache)
        return total
    for layer in layers:
        for value in vars(layer).values():
            add(value)
    return total
