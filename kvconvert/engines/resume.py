"""What lets an interrupted layer-sequential run continue (``--resume``): a fingerprint of
everything that decides the output, the calibration tokens a run sampled, and after each layer
the next layer's inputs, the writer's position and the per-layer records (docs/scale.md)."""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..calibration.data import calibration_tokens
from ..errors import KVConvertError
from ..loading import compute_dtype, load_model
from ..recipe import Recipe
from ..source import Source
from ..version import __version__
from ..writer import ShardedWriter

#: Options that do not change the result (left out of the resume fingerprint).
NOT_FINGERPRINTED = ("output", "overwrite", "resume", "dry_run", "offload_activations")
#: The layout of ``state.json``; part of the fingerprint, so a run saved by a kvconvert that
#: kept records differently is started over instead of misread.
STATE_FORMAT = "records as dicts"


def fingerprint(src: Source, recipe: Recipe, tokens: torch.Tensor | None) -> str:
    """Hash of everything that decides the output: model files, calibration tokens, options."""
    opts = {k: v for k, v in recipe.to_dict().items() if k not in NOT_FINGERPRINTED}
    files = [(p.name, p.stat().st_size) for p in src.tensors.files]
    h = hashlib.sha256()
    h.update(json.dumps([opts, src.config, files, __version__], sort_keys=True).encode())
    h.update(STATE_FORMAT.encode())
    h.update(json.dumps(src.tensors.names()).encode())
    if tokens is not None:
        h.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    state_dir: Path,
    layer: int,
    acts: list[torch.Tensor] | None,
    writer: ShardedWriter,
    results: dict[int, dict[str, Any]],
    fp: str,
) -> None:
    """Record that ``layer`` is complete: next inputs, writer position, results (atomic)."""
    name = None
    if acts is not None:
        name = f"acts-{layer}.safetensors"
        tmp = state_dir / (name + ".tmp")
        save_file({str(j): a.detach().to("cpu").contiguous() for j, a in enumerate(acts)}, tmp)
        os.replace(tmp, state_dir / name)
    state = {
        "fingerprint": fp,
        "next_layer": layer + 1,
        "acts": name,
        "writer": writer.state(),
        "results": {str(i): r for i, r in results.items()},
    }
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_dir / "state.json")
    old = state_dir / f"acts-{layer - 1}.safetensors"
    if old.exists():
        old.unlink()


def verify_fingerprint(state: dict, fp: str, work: Path) -> None:
    if state["fingerprint"] != fp:
        raise KVConvertError(
            f"--resume: {work} was started with a different model, calibration data or options "
            "(fingerprint mismatch); rerun with the same options, or without --resume to start "
            "over"
        )


def load_checkpoint(state_dir: Path, fp: str, writer: ShardedWriter, work: Path) -> dict:
    path = state_dir / "state.json"
    if not path.is_file():
        return {"next_layer": 0, "acts": None, "results": {}}
    state = json.loads(path.read_text())
    verify_fingerprint(state, fp, work)
    writer.restore(state["writer"])
    state["results"] = {int(i): r for i, r in state["results"].items()}
    return state


def calibration_ids(
    recipe: Recipe, src: Source, device: torch.device, state_dir: Path | None, progress: bool
) -> torch.Tensor:
    """Calibration tokens; sampled ones are kept in the work folder so --resume reuses them."""
    saved = state_dir / "tokens.safetensors" if state_dir is not None else None
    if recipe.calibration == "self":
        if recipe.resume and saved is not None and saved.is_file():
            return load_file(saved)["tokens"]
        # Sampling needs the whole model (once, then freed): see docs/scale.md.
        compute = compute_dtype(device, src.dtype)
        model = load_model(src.folder, device, compute, recipe.trust_remote_code)
        tokens = calibration_tokens(recipe, model, src, progress).cpu()
        del model
        gc.collect()
        return tokens
    return calibration_tokens(recipe, None, src, progress)
