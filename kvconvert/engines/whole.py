"""The whole-model engine: load the source model once, let the target observe it on the
calibration data, then stream the target's tensors into an atomic output folder.

Memory: the model in the compute dtype plus what the target measures (docs/scale.md); the
output is written one tensor at a time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..calibration.data import calibration_info, calibration_tokens
from ..loading import compute_dtype, load_model, output_dtype, resolve_device
from ..options import parse_size
from ..recipe import Recipe
from ..source import Source
from ..target import RunInfo, Target
from ..writer import ShardedWriter, atomic_output


def run(
    target: Target,
    recipe: Recipe,
    src: Source,
    output: Path,
    progress: bool,
    command: str | None,
    t0: float,
) -> Path:
    """Convert ``src`` into ``output`` with ``target``; returns the output folder."""
    device = resolve_device(recipe.device)
    out_dtype = output_dtype(recipe.dtype)
    torch.manual_seed(recipe.seed)
    calibration = {"source": target.no_data, "sequences": 0, "seq_len": 0}
    if target.needs_data():
        # data from a file is read (and checked) before the model is loaded
        tokens = (
            None
            if recipe.calibration == "self"
            else calibration_tokens(recipe, None, src, progress)
        )
        model = load_model(
            src.folder, device, compute_dtype(device, src.dtype), recipe.trust_remote_code
        )
        if tokens is None:
            tokens = calibration_tokens(recipe, model, src, progress)
        target.observe(model, tokens, device, progress)
        calibration = calibration_info(recipe, tokens)
        del model
    t_calib = time.perf_counter() - t0
    with atomic_output(output, recipe.overwrite) as work:
        writer = ShardedWriter(work, parse_size(recipe.max_shard_size))
        for name, tensor in target.tensors(device, out_dtype, progress):
            writer.add(name, tensor)
        shards = writer.finish()
        target.finish(RunInfo(work, shards, calibration, out_dtype, command, t0, t_calib))
    return output
