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
    """Bytes of every tensor reachable from a cache object (each storage once).

    Not only its layers' keys and values: masks, copies, spare room or bookkeeping a cache
    keeps between forwards are memory its user pays too, so they count (docs/check.md); views
    into one buffer count as the largest of them. Walks the object's
    attributes, its layers' and any nested list, tuple, dict or object; works for legacy tuple
    caches. 0-dim tensors (counters such as a sliding layer's window size) are not storage.
    """
    largest: dict[int, int] = {}  # per storage: the largest tensor reachable in it
    seen_objects: set[int] = set()

    def add(obj: Any, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.dim() and obj.numel():
                key = obj.untyped_storage().data_ptr()
                largest[key] = max(largest.get(key, 0), obj.numel() * obj.element_size())
            return
        if depth > 6 or id(obj) in seen_objects or isinstance(obj, (str, bytes, int, float)):
            return
        seen_objects.add(id(obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        elif isinstance(obj, (type, torch.nn.Module)):
            return
        else:  # any other object: its attributes (none for objects without a __dict__)
            children = list(getattr(obj, "__dict__", {}).values())
        for child in children:
            add(child, depth + 1)

    add(cache)
    return sum(largest.values())
