"""Architecture registry: ``model_type`` -> :class:`AttentionAdapter`.

Adding an architecture is a new file here with one adapter, plus a line in ``_ADAPTERS``.
"""

from __future__ import annotations

from ..errors import KVConvertError
from .base import AttentionAdapter
from .gemma import GEMMA
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .opt import OPT
from .phi3 import PHI3
from .qwen3 import QWEN3
from .windows import held_tokens, sliding_windows

_ADAPTERS: tuple[AttentionAdapter, ...] = (LLAMA, PHI3, QWEN3, GEMMA, GPT_NEOX, OPT, GPT2)

REGISTRY: dict[str, AttentionAdapter] = {mt: a for a in _ADAPTERS for mt in a.model_types}


def supported_model_types() -> list[str]:
    """Model types with at least one conversion target (recognised-only layouts excluded)."""
    return sorted(mt for mt, a in REGISTRY.items() if a.outputs)


def llama_decoder_types() -> tuple[str, ...]:
    """Model types whose decoder kvconvert's Llama-family model code reproduces."""
    return tuple(mt for mt, a in REGISTRY.items() if a.llama_decoder)


def get_adapter(model_type: str | None) -> AttentionAdapter:
    """The adapter for ``model_type``, or a clear error listing what is supported."""
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    raise KVConvertError(
        f"model_type {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


__all__ = [
    "AttentionAdapter",
    "REGISTRY",
    "get_adapter",
    "held_tokens",
    "llama_decoder_types",
    "sliding_windows",
    "supported_model_types",
]
