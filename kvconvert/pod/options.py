"""The options of ``--target pod``, declared and checked here (docs/cli.md is built from
them); ``Recipe`` holds them with the other groups (docs/architecture.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import KVConvertError
from ..options import option

MAP_BY = ("auto", "cost", "similarity")


@dataclass
class PodOptions:
    """PoD: which tokens are proximal, and how the layer map is chosen."""

    sink: int = option(
        16, "PoD: the first N tokens of a sequence are always proximal (own keys).", type=int
    )
    recent: int | None = option(
        None,
        "PoD: keys at most N positions before a query are proximal (own keys); older ones "
        "are distant and read through the block bottom's keys. Upper layers cache sink + N keys. "
        "Default: the model's context / 8 - sink (the paper's 4080 at 32K), at most --seq-len / 2 "
        "- sink so that calibration sees distant tokens; the report says which bound chose it.",
        type=int,
    )
    threshold: float = option(
        0.5,
        "PoD: a layer joins the block below while their distant-attention similarity "
        "(1 - JSD, 0..1) is at least this. Not used with --kv-saving or --pod-map.",
        type=float,
    )
    kv_saving: float | None = option(
        None,
        "PoD: target KV-cache saving (fraction below 0.5) at --context tokens; the map is "
        "chosen by --map-by. Overrides --threshold.",
        type=float,
    )
    map_by: str = option(
        "auto",
        "PoD: how --kv-saving picks the layers that borrow keys. cost: the map with the least "
        "summed borrowing cost (each head's output error, on calibration data, when it reads "
        "a lower layer's keys); similarity: the most similar consecutive layers first (1 - "
        "JSD of distant-token attention). auto: cost with --kv-saving, similarity with "
        "--threshold.",
        MAP_BY,
    )
    context: int | None = option(
        None,
        "PoD: the context length --kv-saving is the saving at, and the reported saving's "
        "(default: the model's maximum context, at most 32768; --seq-len where it declares "
        "none).",
        type=int,
    )
    max_block: int | None = option(
        None, "PoD: most layers in one block (default: no limit).", type=int
    )
    keep_first: int = option(0, "PoD: the first N layers never borrow keys.", type=int)
    distant_bias: str | None = option(
        None,
        "PoD: comma-separated biases, e.g. 0,-1,-2,-4; each borrowing head gets the one with "
        "the least borrowing cost, added to the logits of the distant tokens it scores with "
        "borrowed keys (negative: it leans on its own proximal keys). Needs --kv-saving "
        "(map by cost). Default: no bias (docs/pod.md, Distant bias).",
    )
    pod_map: str | None = option(
        None,
        "PoD: JSON file with the layer map, [[bottom layer per KV head] per layer] (or a "
        "previous output's config.json); skips calibration.",
    )

    def check_pod(self, seq_len: int, heal_steps: int, heal_seq_len: int | None) -> None:
        """Refuse bad or conflicting PoD options, naming the option; the calibration and
        healing lengths must leave distant tokens to measure and to learn from."""
        for key in ("sink", "recent", "keep_first"):
            v = getattr(self, key)
            if key == "recent" and v is None:  # chosen from the model's context (pod/target.py)
                continue
            if not isinstance(v, int) or v < 0:
                raise KVConvertError(f"{key}: must be an integer >= 0, got {v!r}")
        for key in ("context", "max_block"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
        # the similarity is measured on distant tokens: refuse before any model is loaded
        if self.recent is not None and seq_len <= self.sink + self.recent + 1:
            raise KVConvertError(
                f"seq_len: calibration sequences of {seq_len} tokens have no "
                f"distant tokens with sink {self.sink} + recent {self.recent}; use --seq-len "
                f"above {self.sink + self.recent + 1} or a smaller --recent"
            )
        if (
            heal_steps
            and self.recent is not None
            and heal_seq_len is not None
            and heal_seq_len <= self.sink + self.recent + 1
        ):
            raise KVConvertError(
                f"heal_seq_len: healing sequences of {heal_seq_len} tokens have no "
                f"distant tokens with sink {self.sink} + recent {self.recent}, so healing "
                f"would teach nothing; use --heal-seq-len above {self.sink + self.recent + 1}"
            )
        if not 0 <= self.threshold <= 1:
            raise KVConvertError(f"threshold: must lie in [0, 1], got {self.threshold}")
        if self.kv_saving is not None and not 0 < self.kv_saving < 0.5:
            raise KVConvertError(
                f"kv_saving: must lie in (0, 0.5) (values are never shared), got {self.kv_saving}"
            )
        grid = self.distant_biases()  # refuses unreadable text
        if grid and (self.pod_map or self.kv_saving is None or self.map_by == "similarity"):
            raise KVConvertError(
                "distant_bias: the bias is chosen with the borrowing-cost map; give --kv-saving "
                "F (with --map-by auto or cost) and no --pod-map"
            )
        if self.map_by == "cost" and self.kv_saving is None and not self.pod_map:
            raise KVConvertError(
                "map_by: cost chooses the map that reaches a --kv-saving target; give "
                "--kv-saving F, or use --map-by similarity with --threshold"
            )

    def distant_biases(self) -> tuple[float, ...]:
        """``--distant-bias`` as numbers (empty when not given)."""
        if self.distant_bias is None:
            return ()
        text = self.distant_bias
        parts = text if isinstance(text, list | tuple) else str(text).split(",")
        try:
            grid = tuple(float(x) for x in parts)
        except ValueError:
            raise KVConvertError(
                f"distant_bias: cannot read {text!r} (e.g. 0,-1,-2,-4: logit biases to choose from)"
            ) from None
        if not grid or any(not math.isfinite(b) for b in grid):
            raise KVConvertError(f"distant_bias: {text!r} must be finite numbers, e.g. 0,-1,-2")
        return tuple(sorted(set(grid), reverse=True))


# --- what healing asks of a PoD output's config ----------------------------------------------
def borrowing_layers(config: Any) -> set[int]:
    """The layers of a PoD model that read another layer's keys (``config.pod_map`` of a
    loaded model's config); none for other models."""
    pod_map = getattr(config, "pod_map", None) or []
    return {layer for layer, row in enumerate(pod_map) if any(b != layer for b in row)}


def proximal_window(config: Any) -> tuple[int, int] | None:
    """(sink, recent) of a PoD model some of whose layers borrow keys; None for other models
    (not PoD, or an identity map: nothing differs from the original)."""
    sink, recent = getattr(config, "pod_sink", None), getattr(config, "pod_recent", None)
    if sink is None or recent is None or not borrowing_layers(config):
        return None
    return sink, recent
