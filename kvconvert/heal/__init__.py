"""Recovery after conversion: distil the original model into the converted one.

``heal(HealOptions(...))`` is the whole run (see ``run.py``); ``convert_and_heal`` is what
``kvconvert MODEL ... --heal-steps N`` does: convert into a hidden folder, then heal from it
into the requested output.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..recipe import Recipe
from ..writer import check_output
from .options import HealOptions
from .run import HealRun, heal, state_folder

__all__ = [
    "HealOptions",
    "HealRun",
    "convert_and_heal",
    "heal",
    "heal_options_from",
    "state_folder",
]


def heal_options_from(recipe: Recipe, converted: str) -> HealOptions:
    """The healing options of a ``convert --heal-steps`` run (other options keep defaults)."""
    return HealOptions(
        original=recipe.model,
        converted=converted,
        output=recipe.output,
        steps=recipe.heal_steps,
        train=recipe.heal_train,
        lora=recipe.heal_lora,
        lr=recipe.heal_lr,
        final_lr=recipe.heal_final_lr,
        batch_size=recipe.heal_batch_size,
        seq_len=recipe.heal_seq_len,
        num_samples=recipe.heal_num_samples,
        calibration=recipe.calibration,
        text_field=recipe.text_field,
        seed=recipe.seed,
        device=recipe.device,
        resume=recipe.heal_resume,
        revision=recipe.revision,
        trust_remote_code=recipe.trust_remote_code,
        overwrite=recipe.overwrite,
    )


def convert_and_heal(recipe: Recipe, progress: bool = True, command: str | None = None) -> Path:
    """Convert into a hidden folder beside the output, heal from it into the output."""
    from ..distributed import dist_setup, from_rank0, local_device
    from ..pipeline import convert, resolve_device

    output = Path(recipe.output).expanduser()
    check_output(output, recipe.overwrite)
    rank, world = dist_setup(local_device(resolve_device(recipe.device)))
    tag = from_rank0(os.getpid(), world)  # under torchrun every rank heals the same folder
    staged = output.parent / f".{output.name}.kvconvert-unhealed-{tag}"
    opts = heal_options_from(recipe, str(staged)).validate()
    try:
        convert(
            replace(recipe, output=str(staged), overwrite=True, heal_steps=0), progress, command
        )
        return heal(opts, progress, command)
    finally:
        if rank == 0:
            shutil.rmtree(staged, ignore_errors=True)
