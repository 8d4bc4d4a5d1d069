"""kvconvert: convert Hugging Face causal LMs into checkpoints with a smaller KV cache.

Python API::

    import kvconvert
    kvconvert.convert("org/model", "out/", kv_heads=8)            # options as in the CLI
    kvconvert.inspect_model("org/model")                          # is it supported, and how
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import KVConvertError
from .recipe import Recipe

__all__ = ["KVConvertError", "Recipe", "convert", "inspect_model"]
__version__ = "0.1.0"


def convert(model: str, output: str, *, progress: bool = True, **options: Any) -> Path:
    """Convert ``model`` (folder or Hub id) into ``output``; options are Recipe fields.

    Returns the output folder. Raises :class:`KVConvertError` on bad input.
    """
    from .pipeline import convert as _convert

    unknown = set(options) - set(Recipe.field_names())
    if unknown:
        raise KVConvertError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return _convert(Recipe(model=model, output=output, **options), progress=progress)


def inspect_model(model: str, revision: str | None = None) -> dict[str, Any]:
    """What ``kvconvert inspect`` prints, as a dict (config and safetensors headers only)."""
    from .inspection import inspect_model as _inspect

    return _inspect(model, revision)
