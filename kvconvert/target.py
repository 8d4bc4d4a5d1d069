"""The interface between engines and targets (docs/architecture.md, "Adding a target").

An *engine* runs the source model over calibration data and streams the output's tensors to
a writer; a *target* (``gqa/``, ``pod/``) decides what to measure, turns the measurements into
new tensors, and describes the output (config, model code, report, card). The abstract methods
of :class:`Target` are exactly what the engines call, so adding a target means adding a folder
with a ``target.py`` and one line in ``targets.py``; no engine or conductor branch changes.

The whole-model engine calls ``observe`` (when ``needs_data``), then ``tensors``, then
``finish``. The layer-sequential engine, for targets whose ``why_not_layer_by_layer`` is None,
hands each layer to ``solve_layer`` (one :class:`LayerContext`) instead, keeps the
:class:`SolvedLayer` records it returns (also across ``--resume``) and calls ``finish`` with
them in the :class:`RunInfo`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .calibration.samples import AttentionSamples
from .calibration.stats import LayerStats
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


@dataclass
class LayerContext:
    """Everything the layer-sequential engine knows about one layer when it asks for its
    tensors. ``stats``: the layer's calibration second moments, summed over torchrun ranks
    (None for a run without data); ``read``: the layer's attention tensors as stored, read
    once by the engine; ``samples``/``original``: what the original attention module saw and
    produced on the calibration data, where ``wants_samples`` asked for them; ``world``: the
    number of torchrun ranks (1 in one process)."""

    layer: int
    device: torch.device
    out_dtype: torch.dtype | None
    read: Mapping[str, torch.Tensor]
    stats: LayerStats | None = None
    samples: AttentionSamples | None = None
    original: torch.nn.Module | None = None
    world: int = 1


@dataclass
class SolvedLayer:
    """One converted layer: its new tensors by checkpoint name, and what the report keeps of
    it (a JSON-able dict, stored in the resume state as it is)."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]


@dataclass
class RunInfo:
    """What ``finish`` needs of the run: the work folder and its weight shards, the
    calibration summary, the output dtype, the command line, ``time.perf_counter()`` at the
    start (``t0``), seconds up to the end of calibration (``t_calib``), and the
    layer-sequential engine's per-layer records (the whole-model engine's stay with the
    target)."""

    work: Path
    shards: list[str]
    calibration: dict[str, Any]
    out_dtype: torch.dtype | None
    command: str | None
    t0: float
    t_calib: float
    layers: Mapping[int, dict[str, Any]] = field(default_factory=dict)


class Target(ABC):
    """One conversion of one source: built per run, after the options were checked against
    the source's config (the constructor raises KVConvertError before any model is loaded)."""

    #: the ``--target`` value
    name = ""
    #: kvconvert.json "calibration" "source" when no data is needed
    no_data = "none"

    def __init__(self, src: Source, recipe: Recipe):
        check_target(src, self.name)
        self.src, self.recipe = src, recipe

    # --- both engines ----------------------------------------------------------------------
    @abstractmethod
    def needs_data(self) -> bool:
        """Whether calibration data (and so the source model) is needed at all."""

    @abstractmethod
    def finish(self, run: RunInfo) -> None:
        """Everything but the weights: config, model code, side files, report, model card."""

    # --- whole-model engine ----------------------------------------------------------------
    @abstractmethod
    def observe(
        self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, progress: bool
    ) -> None:
        """Measure what the target needs on the loaded source model (hooks, swaps)."""

    @abstractmethod
    def tensors(
        self, device: torch.device, out_dtype: torch.dtype | None, progress: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor in checkpoint order, produced lazily."""

    # --- layer-sequential engine (override all of these to run layer by layer) -------------
    def why_not_layer_by_layer(self) -> str | None:
        """Why the layer-sequential engine cannot run this conversion (None: it can)."""
        return f"--target {self.name}"

    def solve_layer(self, ctx: LayerContext) -> SolvedLayer:
        """One layer's new tensors, from what the engine measured of it."""
        raise NotImplementedError(f"--target {self.name} does not run layer by layer")

    def wants_samples(self, layer: int) -> bool:
        """Whether ``solve_layer`` needs the original attention's inputs and outputs."""
        return False

    def layer_overrides(self, layer: int) -> dict[str, Any]:
        """Config attributes under which a converted layer is built (``--propagate
        converted`` runs it), e.g. its KV head count; {}: the source's config."""
        return {}

    def output_fraction(self, name: str) -> float:
        """The output tensor ``name``'s size as a fraction of the source's (disk estimates)."""
        return 1.0

    def dry_run_lines(self, out_dtype: torch.dtype | None) -> list[str]:
        """What ``--dry-run`` prints about the target (the engine adds cost and memory)."""
        return [f"target       {self.name}"]
