"""The models an eval compares: resolved, loaded, and described (class, dtype, cache bytes,
what their kvconvert.json says and promises)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import KVConvertError
from ..promise import expected_bytes
from .metrics import kv_cache_bytes


def is_kvconvert_output(folder: Path) -> bool:
    """A kvconvert output with remote code: its own report plus an ``auto_map``."""
    cfg = folder / "config.json"
    if not ((folder / "kvconvert.json").is_file() and cfg.is_file()):
        return False
    try:
        return "auto_map" in json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False


def resolve_model(name: str, progress: bool) -> Path:
    """Local folder for a path or Hub id (fetching *.py is harmless; running it is gated)."""
    from ..source import read_config, resolve_source

    folder = resolve_source(name, None, True, progress)
    read_config(folder)
    return folder


def load_eval_model(
    name: str, device: torch.device, dtype: str, trust_remote_code: bool, progress: bool
) -> tuple[torch.nn.Module, Path]:
    """One model of the comparison, in eval mode on ``device``, and its folder. A kvconvert
    output runs its own model code without ``--trust-remote-code``: that code is this
    package's (``kvconvert/modeling/``)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(name, progress)
    trust = trust_remote_code or is_kvconvert_output(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust,
            device_map=str(device) if device.type != "cpu" else None,
        )
    except Exception as e:  # noqa: BLE001 - one clear line for any loader failure
        hint = "" if trust else " (if it needs its own code, pass --trust-remote-code)"
        raise KVConvertError(f"cannot load {name}: {str(e).splitlines()[0]}{hint}") from e
    return model.to(device).eval(), folder


def _read_report(folder: Path) -> dict[str, Any] | None:
    """An output's kvconvert.json (None where the folder has none)."""
    p = folder / "kvconvert.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _conversion_info(rep: dict[str, Any] | None) -> dict[str, Any] | None:
    if rep is None:
        return None
    return {
        "target": rep.get("target"),
        "method": (rep.get("recipe") or {}).get("method"),
        "layers": rep.get("layers", []),
    }


def promised_bytes(
    model: torch.nn.Module, report: dict[str, Any] | None, tokens: int
) -> int | None:
    """The cache bytes an output's kvconvert.json promises at ``tokens`` (None: no report, or
    it cannot say)."""
    if report is None:
        return None
    dtype = next(model.parameters()).dtype
    return expected_bytes(report, model.config, tokens, dtype)[0]


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest context the model's config allows (None: it does not say)."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    v = getattr(cfg, "max_position_embeddings", None)
    return int(v) if isinstance(v, int) else None


def model_entry(
    name: str,
    role: str,
    model: torch.nn.Module,
    folder: Path,
    tokens: torch.Tensor,
    context: int,
) -> dict[str, Any]:
    """One model's entry of the ``--json`` document, before its measurements are filled in."""
    one = tokens[:1, :1]
    report = _read_report(folder)
    return {
        "name": name,
        "role": role,
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "kv_bytes_per_token": kv_cache_bytes(model, one),
        "kl": 0.0 if role == "original" else None,
        "top1_agreement": 1.0 if role == "original" else None,
        "nll": None,
        "conversion": _conversion_info(report),
        "kv_bytes_promised": promised_bytes(model, report, context)
        if role == "converted"
        else None,
    }
