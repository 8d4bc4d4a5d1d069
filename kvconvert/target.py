"""The interface between engines and targets (docs/architecture.md).

An *engine* runs the source model over calibration data and streams the output's tensors to
a writer; a *target* (``gqa/``, ``pod/``) decides what to measure, turns the measurements into
new tensors, and describes the output (config, model code, report, card). Engines only call the
methods below, so adding a target means adding a folder with a ``target.py`` and one line in
``targets.py``; no engine or conductor branch changes.

The whole-model engine calls ``observe`` (when ``needs_data``), then ``tensors``, then
``finish``. The layer-sequential engine, for targets whose ``layer_by_layer`` says so, hands
each layer's statistics to ``solve_layer`` instead and calls ``finish`` at the end.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import KVConvertError
from .recipe import Recipe
from .source import Source


def check_target(src: Source, target: str) -> None:
    """Refuse a target the architecture has no output for (its adapter's ``outputs``)."""
    outputs = src.adapter.outputs
    if target not in outputs:
        have = ", ".join(outputs) if outputs else "none yet"
        raise KVConvertError(
            f"model_type {src.config.get('model_type')!r}: --target {target} is not available "
            f"for this architecture (available: {have}); see docs/architectures.md"
        )


class Target:
    """One conversion of one source: built per run, after the options were checked against
    the source's config (the constructor raises KVConvertError before any model is loaded)."""

    #: the ``--target`` value
    name = ""
    #: kvconvert.json "calibration" "source" when no data is needed
    no_data = "none"

    def __init__(self, src: Source, recipe: Recipe):
        check_target(src, self.name)
        self.src, self.recipe = src, recipe

    # --- what the engines ask --------------------------------------------------------------
    def needs_data(self) -> bool:
        """Whether calibration data (and so the source model) is needed at all."""
        raise NotImplementedError

    def why_not_layer_by_layer(self) -> str | None:
        """Why the layer-sequential engine cannot run this conversion (None: it can)."""
        return f"--target {self.name}"

    # --- whole-model engine ----------------------------------------------------------------
    def observe(
        self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, progress: bool
    ) -> None:
        """Measure what the target needs on the loaded source model (hooks, swaps)."""
        raise NotImplementedError

    def tensors(
        self, device: torch.device, out_dtype: torch.dtype | None, progress: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor in checkpoint order, produced lazily."""
        raise NotImplementedError

    # --- layer-sequential engine -----------------------------------------------------------
    def solve_layer(
        self,
        layer: int,
        stats: Any,
        device: torch.device,
        out_dtype: torch.dtype | None,
        read: Mapping[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """One layer's new tensors by checkpoint name, from that layer's statistics; and what
        the report keeps of the layer."""
        raise NotImplementedError(f"--target {self.name} does not run layer by layer")

    def dry_run_lines(self, out_dtype: torch.dtype | None) -> list[str]:
        """What ``--dry-run`` prints about the target (the engine adds cost and memory)."""
        raise NotImplementedError(f"--target {self.name} does not run layer by layer")

    # --- both ------------------------------------------------------------------------------
    def finish(
        self,
        work: Path,
        shards: list[str],
        calibration: dict[str, Any],
        out_dtype: torch.dtype | None,
        command: str | None,
        t0: float,
        t_calib: float,
        results: Mapping[int, Any] | None = None,
    ) -> None:
        """Everything but the weights: config, model code, side files, report, model card.

        ``t0``: ``time.perf_counter()`` at the start of the run; ``t_calib``: seconds spent up
        to the end of calibration; ``results``: per-layer records from the layer-sequential
        engine (the whole-model engine's stay with the target)."""
        raise NotImplementedError
