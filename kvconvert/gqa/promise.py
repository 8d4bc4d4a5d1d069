"""The cache bytes a GQA output's report promises: its KV bytes per token, each layer's share
over the tokens that layer's cache holds (docs/check.md)."""

from __future__ import annotations

from typing import Any

from ..arch import held_tokens, sliding_windows
from ..report import dtype_scale

#: the report key this promise is read from (a report of another kind lacks it)
REPORT_KEY = "kv_bytes_per_token"


def promised_bytes(
    report: dict[str, Any], config: Any, tokens: int, size: int
) -> tuple[int | None, str]:
    """Bytes after ``tokens`` tokens at ``size`` bytes an element, and where that number
    comes from (or None and why it cannot be derived). ``config``: the loaded model's."""
    per_token = report.get(REPORT_KEY)
    if not isinstance(per_token, dict) or not isinstance(per_token.get("after"), int):
        return None, "kvconvert.json has no kv_bytes_per_token.after"
    scale = dtype_scale(per_token.get("dtype"), size)
    if scale is None:
        return None, f"kvconvert.json names an unknown dtype {per_token.get('dtype')!r}"
    windows = sliding_windows(config.get_text_config())
    counts = (report.get("target") or {}).get("num_key_value_heads")
    counts = [counts] * len(windows) if isinstance(counts, int) else counts
    if not isinstance(counts, list) or len(counts) != len(windows) or not sum(counts):
        return None, "kvconvert.json has no per-layer KV head counts for this model's layers"
    # a sliding layer holds only its window: weigh each layer's tokens by its share of the
    # per-token bytes
    held = sum(c * held_tokens(tokens, w) for c, w in zip(counts, windows, strict=True))
    how = f"{per_token['after']} bytes/token in {per_token.get('dtype')} x {tokens} tokens"
    if held != sum(counts) * tokens:
        how += " (sliding layers: their window)"
    return round(per_token["after"] * scale * held / sum(counts)), how
