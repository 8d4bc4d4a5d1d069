"""The conductor: source -> calibrate -> solve -> write, and the runs composed of runs.

The CLI and the Python API call only this file (and the option types). It opens the source,
builds the ``--target``'s object from the registry (``targets.py``), and hands both to an
engine: the layer-sequential one where the target can go layer by layer, else the
whole-model one. Compositions live here too: ``gqa,pod`` (merge heads, then PoD on the merged
checkpoint) and convert-then-heal. Nothing in the package imports this file; see
docs/architecture.md for the floors below it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import hub
from .check import check
from .distributed import dist_setup, from_rank0, local_device, world_size
from .enginecheck import check_engine
from .engines import sequential, whole
from .errors import KVConvertError
from .evaluate import evaluate
from .heal import HealOptions
from .heal import heal as heal_run
from .inspection import inspect_model
from .loading import command_line, quiet_libraries, resolve_device, set_threads
from .pod.target import PodTarget
from .recipe import Recipe
from .report import publishable
from .source import Source
from .target import check_target
from .targets import target_class
from .writer import check_output, os_error_line, output_lock

__all__ = [
    "HealOptions",
    "Recipe",
    "check",
    "check_engine",
    "command_line",
    "convert",
    "convert_and_heal",
    "evaluate",
    "heal",
    "inspect_model",
    "push",
]


def convert(recipe: Recipe, progress: bool = True, command: str | None = None) -> Path:
    """Run a whole conversion (and healing, with ``heal_steps``); return the output folder.

    The output is locked for the whole run (a second run to it refuses), and file-system
    failures end in one line (KVConvertError) that says whether ``--resume`` can finish."""
    recipe.validate()
    set_threads(recipe.threads)
    output = Path(recipe.output).expanduser()
    with output_lock(output), one_line_os_errors(output):
        if recipe.heal_steps:
            return convert_and_heal(recipe, progress, command)
        t0 = time.perf_counter()
        check_output(output, recipe.overwrite)
        if not progress:
            quiet_libraries()
        src = Source(recipe.model, recipe.revision, recipe.trust_remote_code, progress)
        try:
            return _convert(recipe, src, output, progress, command, t0)
        finally:
            src.close()


def heal(
    opts: HealOptions,
    progress: bool = True,
    command: str | None = None,
    callback: Callable[..., None] | None = None,
) -> Path:
    """Heal a converted model by distillation (``kvconvert.heal.heal``), its output locked."""
    output = Path(opts.output).expanduser()
    with output_lock(output), one_line_os_errors(output):
        return heal_run(opts, progress, command, callback)


@contextmanager
def one_line_os_errors(output: Path) -> Iterator[None]:
    """A full disk, a read-only folder or a vanished file: one line naming the file and what
    is left to continue from, instead of a traceback."""
    try:
        yield
    except OSError as e:
        raise KVConvertError(os_error_line(e, output)) from e


def _convert(
    recipe: Recipe, src: Source, output: Path, progress: bool, command: str | None, t0: float
) -> Path:
    check_target(src, recipe.target)
    if recipe.target == "gqa,pod":
        single_process("--target gqa,pod")
        return _merge_then_pod(recipe, src, output, progress, command, t0)
    target = target_class(recipe.target)(src, recipe)
    if sequential.applies(target, recipe):  # bounded memory, resume, dry run, torchrun
        return sequential.run(target, recipe, src, output, progress, command, t0)
    why = target.why_not_layer_by_layer() or "--pipeline whole"
    single_process(f"a conversion with {why}")
    return whole.run(target, recipe, src, output, progress, command, t0)


def single_process(what: str) -> None:
    """Only the layer-sequential engine splits work across torchrun ranks; anything else run
    under torchrun would compute the same output on every rank and write it N times."""
    if world_size() > 1:
        raise KVConvertError(
            f"torchrun: {what} runs in one process only (the layer-sequential engine, uniform "
            "--kv-heads GQA on the Llama layout, is the distributed one); run without torchrun"
        )


def _merge_then_pod(
    recipe: Recipe, src: Source, output: Path, progress: bool, command: str | None, t0: float
) -> Path:
    """``--target gqa,pod``: merge KV heads into a temporary GQA checkpoint, then compute the
    PoD map on it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.gqa-", dir=output.parent) as tmp:
        stage = Path(tmp) / "gqa"
        merge = replace(recipe, target="gqa", output=str(stage), overwrite=False)
        _convert(merge, src, stage, progress, command, t0)
        merged = Source(str(stage), None, recipe.trust_remote_code, progress)
        try:
            gqa: dict[str, Any] = json.loads((stage / "kvconvert.json").read_text())
            target = PodTarget(merged, recipe, merged_from=gqa)
            return whole.run(target, recipe, merged, output, progress, command, t0)
        finally:
            merged.close()


def convert_and_heal(recipe: Recipe, progress: bool = True, command: str | None = None) -> Path:
    """``kvconvert MODEL ... --heal-steps N``: convert into a hidden folder beside the output,
    heal from it into the output."""
    output = Path(recipe.output).expanduser()
    check_output(output, recipe.overwrite)
    rank, world = dist_setup(local_device(resolve_device(recipe.device)))
    tag = from_rank0(os.getpid(), world)  # under torchrun every rank heals the same folder
    staged = output.parent / f".{output.name}.kvconvert-unhealed-{tag}"
    opts = recipe.heal_options(str(staged)).validate()
    try:
        convert(
            replace(recipe, output=str(staged), overwrite=True, heal_steps=0), progress, command
        )
        return heal_run(opts, progress, command)
    finally:
        if rank == 0:
            shutil.rmtree(staged, ignore_errors=True)


def push(folder: str | Path, repo_id: str, **kwargs: Any) -> str:
    """Upload a finished output; its card, recipe and report go up without local paths
    (``report.publishable``; docs/publishing.md), the local files stay as they are."""
    path = Path(folder).expanduser()
    rewritten = {}
    if (path / "kvconvert.json").is_file():
        try:
            rewritten = publishable(path)
        except (OSError, ValueError) as e:
            raise KVConvertError(f"push: cannot read {path / 'kvconvert.json'}: {e}") from None
    return hub.push(path, repo_id, rewritten=rewritten, **kwargs)
