"""The cache bytes a PoD output's report promises: the dense bytes of the tokens each layer
holds, less the keys that borrowing heads drop for distant tokens (docs/check.md)."""

from __future__ import annotations

from typing import Any

from ..arch import held_tokens, sliding_windows
from ..report import dtype_scale
from .layermap import predicted_saving

#: the report key this promise is read from (a report of another kind lacks it)
REPORT_KEY = "kv_bytes"


def promised_bytes(
    report: dict[str, Any], config: Any, tokens: int, size: int
) -> tuple[int | None, str]:
    """The report's own formula at ``tokens`` instead of its context, at ``size`` bytes an
    element; or None and why it cannot be derived. ``config``: the loaded model's."""
    kvb, target = report.get(REPORT_KEY) or {}, report.get("target") or {}
    dense = kvb.get("dense_per_token")
    pod_map, sink, recent = target.get("pod_map"), target.get("sink"), target.get("recent")
    if not isinstance(dense, int) or not pod_map or sink is None or recent is None:
        return None, "kvconvert.json lacks kv_bytes.dense_per_token or the PoD map"
    scale = dtype_scale(kvb.get("dtype"), size)
    if scale is None:
        return None, f"kvconvert.json names an unknown dtype {kvb.get('dtype')!r}"
    windows = pod_windows(config, len(pod_map))
    held = dense // len(pod_map) * sum(held_tokens(tokens, w) for w in windows)
    saving = predicted_saving(pod_map, sink, recent, tokens, windows)
    return round(held * (1 - saving) * scale), (
        f"{dense} dense bytes/token in {kvb.get('dtype')}, PoD saving {saving:.4f} at {tokens} "
        "tokens"
    )


def pod_windows(config: Any, layers: int) -> list[int | None]:
    """The Llama-layout PoD model keeps full caches in every layer; the stock-architecture
    ones (model_type kvconvert_pod_<stock>) keep the stock sliding caches."""
    if str(getattr(config, "model_type", "")).startswith("kvconvert_pod_"):
        return sliding_windows(config.get_text_config())
    return [None] * layers
