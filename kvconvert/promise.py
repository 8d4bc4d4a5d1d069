"""The cache bytes a conversion report (``kvconvert.json``) promises, for any token count.

``kvconvert check`` and ``kvconvert eval`` hold the bytes of every tensor reachable from a real
cache object against this promise (docs/check.md): a cache that keeps masks, copies or more
keys than its formula says is flagged.
"""

from __future__ import annotations

from typing import Any

import torch

from .modeling.configuration_kvconvert_pod import sliding_windows as stock_windows
from .report import DTYPE_BYTES

#: how far measured cache bytes may stray from the report's promise
BYTES_TOLERANCE = 0.01


def expected_bytes(
    report: dict[str, Any], config: Any, tokens: int, dtype: torch.dtype
) -> tuple[int | None, str]:
    """Cache bytes the report promises after ``tokens`` tokens in ``dtype``, and where that
    number comes from (or None and why it cannot be derived)."""
    size = torch.empty((), dtype=dtype).element_size()
    kind = (report.get("target") or {}).get("kind")
    if kind == "pod" or "kv_bytes" in report:
        return _pod_expected(report, config, tokens, size)
    per_token = report.get("kv_bytes_per_token")
    if not isinstance(per_token, dict) or not isinstance(per_token.get("after"), int):
        return None, "kvconvert.json has no kv_bytes_per_token.after"
    scale = _dtype_scale(per_token.get("dtype"), size)
    if scale is None:
        return None, f"kvconvert.json names an unknown dtype {per_token.get('dtype')!r}"
    windows = sliding_windows(config)
    counts = (report.get("target") or {}).get("num_key_value_heads")
    counts = [counts] * len(windows) if isinstance(counts, int) else counts
    if not isinstance(counts, list) or len(counts) != len(windows) or not sum(counts):
        return None, "kvconvert.json has no per-layer KV head counts for this model's layers"
    # a sliding layer holds only its window (window - 1 tokens after a prefill, as transformers'
    # sliding cache keeps them): weigh each layer's tokens by its share of the per-token bytes
    held = sum(c * held_tokens(tokens, w) for c, w in zip(counts, windows, strict=True))
    how = f"{per_token['after']} bytes/token in {per_token.get('dtype')} x {tokens} tokens"
    if held != sum(counts) * tokens:
        how += " (sliding layers: their window)"
    return round(per_token["after"] * scale * held / sum(counts)), how


def held_tokens(tokens: int, window: int | None) -> int:
    """Tokens a layer's cache holds after a prefill: all, or a sliding layer's window - 1."""
    return tokens if window is None else min(tokens, window - 1)


def _dtype_scale(name: Any, size: int) -> float | None:
    have = DTYPE_BYTES.get(str(name))
    return None if have is None else size / have


def sliding_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window its cache applies (None: full), by the stock rule."""
    return stock_windows(config.get_text_config())


def _pod_expected(
    report: dict[str, Any], config: Any, tokens: int, size: int
) -> tuple[int | None, str]:
    """PoD: dense bytes for the tokens each layer holds, less the keys that borrowing heads
    drop for distant tokens (the report's own formula, at ``tokens`` instead of its context)."""
    from .pod.layermap import predicted_saving

    kvb, target = report.get("kv_bytes") or {}, report.get("target") or {}
    dense = kvb.get("dense_per_token")
    pod_map, sink, recent = target.get("pod_map"), target.get("sink"), target.get("recent")
    if not isinstance(dense, int) or not pod_map or sink is None or recent is None:
        return None, "kvconvert.json lacks kv_bytes.dense_per_token or the PoD map"
    scale = _dtype_scale(kvb.get("dtype"), size)
    if scale is None:
        return None, f"kvconvert.json names an unknown dtype {kvb.get('dtype')!r}"
    windows = _pod_windows(config, len(pod_map))
    held = dense // len(pod_map) * sum(held_tokens(tokens, w) for w in windows)
    saving = predicted_saving(pod_map, sink, recent, tokens, windows)
    return round(held * (1 - saving) * scale), (
        f"{dense} dense bytes/token in {kvb.get('dtype')}, PoD saving {saving:.4f} at {tokens} "
        "tokens"
    )


def _pod_windows(config: Any, layers: int) -> list[int | None]:
    """The Llama-layout PoD model keeps full caches in every layer; the stock-architecture
    ones (model_type kvconvert_pod_<stock>) keep the stock sliding caches."""
    if str(getattr(config, "model_type", "")).startswith("kvconvert_pod_"):
        return sliding_windows(config)
    return [None] * layers
