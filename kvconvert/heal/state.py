"""A heal's resumable state: the hidden work folder beside the output, what is saved in it every
``--save-every`` steps and on Ctrl-C, and the checks that a resumed run is the same run
(docs/heal.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import KVConvertError
from .options import HealOptions

STATE_VERSION = 1


def state_folder(output: Path) -> Path:
    """Where an unfinished run keeps its resumable state: a hidden folder beside the output."""
    return output.parent / f".{output.name}.kvconvert-heal"


def check_leftovers(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse --resume with nothing saved, and a fresh run over an interrupted one's state
    (which --overwrite discards)."""
    saved = state_folder(output) / "state.pt"
    sampled = saved.with_name("sampled.pt")  # interrupted while sampling the training text
    if resume and not (saved.is_file() or sampled.is_file()):
        raise KVConvertError(
            f"--resume: there is no interrupted heal to resume ({saved.parent} is absent)"
        )
    if (saved.is_file() or sampled.is_file()) and not resume and not overwrite:
        raise KVConvertError(
            f"{saved.parent} holds an interrupted heal; add --resume to continue it, or "
            "--overwrite to discard it and start over"
        )


def fingerprint(opts: HealOptions, world: int, digest: str) -> dict[str, Any]:
    """What must match for a saved state to resume: the options that shape the run, and the
    converted tensors it started from."""
    # W ranks with --grad-accum A compute what one process with A*W does: a state saved
    # under torchrun resumes in one process with --grad-accum A*W.
    fp = {**opts.fingerprint(), "grad_accum": opts.grad_accum * world}
    return {**fp, "initial_digest": digest}


def save_state(folder: Path, fp: dict[str, Any], parts: dict[str, Any]) -> None:
    """Write ``parts`` (the loop's and the data's state) with the fingerprint and the RNG
    states to ``folder/state.pt``, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "version": STATE_VERSION,
        "fingerprint": json.dumps(fp, sort_keys=True),
        **parts,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = folder / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / "state.pt")  # a second Ctrl-C never leaves a torn state


def load_state(folder: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The state saved in ``folder`` (None if there is none), with the RNG states restored;
    raise if it belongs to another run (``fp`` is this run's fingerprint)."""
    path = folder / "state.pt"
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise KVConvertError(f"{path} was saved by another kvconvert version; cannot resume")
    saved = json.loads(state["fingerprint"])
    saved.setdefault("final_lr", 0.1)  # states saved before --final-lr existed used 0.1
    diff = sorted(k for k in set(saved) | set(fp) if saved.get(k) != fp.get(k))
    if diff:
        raise KVConvertError(
            f"--resume: the saved run in {path.parent} differs in {', '.join(diff)}; rerun "
            "with the same options, or without --resume to start over"
        )
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state
