"""Loading models and tokenizers, choosing devices and dtypes, keeping libraries quiet.

A low room: every stage (calibration, targets, engines, evaluation, healing) loads through
here, and this file imports nothing of kvconvert's but the error type. See
docs/architecture.md for the floors.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import KVConvertError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KVConvertError("device: --device cuda given but no CUDA device is available")
    return torch.device(name)


def output_dtype(name: str) -> torch.dtype | None:
    """The output's float dtype from ``--dtype`` (None: keep each tensor's stored dtype)."""
    return None if name == "auto" else getattr(torch, name)


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """Calibration runs in float32 on the CPU (half-precision matmuls are slow or missing
    there) and in the checkpoint's own dtype on accelerators."""
    return torch.float32 if device.type == "cpu" else stored


def set_threads(threads: int | None) -> None:
    """``--threads``: how many CPU threads torch's kernels use (None: leave torch's choice).

    On a machine whose cores are busy, torch's default (one thread per core) can be several
    times slower than one thread; docs/scale.md has the measurements."""
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 1:
        raise KVConvertError(f"threads: must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)


def load_model(folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """A model for calibration, evaluation or healing: one copy, on ``device``, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            device_map=str(device) if device.type != "cpu" else None,
        )
    except Exception as e:  # noqa: BLE001 - surface loader failures as one clear line
        raise KVConvertError(f"cannot load the model from {folder}: {e}") from e
    return model.to(device).eval()


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any | None:
    """The folder's tokenizer, or None for token-id-only models."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - token-id-only models have no tokenizer
        return None


def bos_token_id(folder: Path, config: dict[str, Any], tokenizer: Any | None) -> int:
    """The id sampling starts from: the config's, the generation config's, the tokenizer's."""
    for cand in (config.get("bos_token_id"), _generation_config(folder).get("bos_token_id")):
        if isinstance(cand, int):
            return cand
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    raise KVConvertError(
        "--calibration self needs a BOS token id and this model declares none; give "
        "calibration data instead (a .txt or .jsonl file)"
    )


def _generation_config(folder: Path) -> dict[str, Any]:
    p = folder / "generation_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def quiet_libraries() -> None:
    """No download bars or loader chatter from huggingface_hub and transformers (--quiet)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def command_line() -> str:
    """The command as the user typed it, for reports (``kvconvert`` plus its arguments)."""
    return shlex.join(["kvconvert", *sys.argv[1:]])
