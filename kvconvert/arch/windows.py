"""Sliding-window layers as the stock transformers caches keep them: the one place that says
which layers slide and how many tokens such a layer's cache holds (docs/pod.md)."""

from __future__ import annotations

from typing import Any


def sliding_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window the stock model applies there (None: full attention):
    ``layer_types`` where the config has them (gemma2, qwen3), else ``sliding_window`` set
    means every layer slides (phi3, mistral). ``config``: a transformers config or a dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    window = get("sliding_window", None)
    types = get("layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * int(get("num_hidden_layers"))


def held_tokens(tokens: int, window: int | None) -> int:
    """Tokens a layer's cache holds after ``tokens`` tokens: all of them, or a sliding
    layer's window - 1 (as transformers' sliding cache keeps them after a prefill)."""
    return tokens if window is None else min(tokens, window - 1)
