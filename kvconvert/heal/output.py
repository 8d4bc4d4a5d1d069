"""The healed output: the converted folder with only the trained tensors replaced (same files,
names, dtypes, shards, remote code and config), plus the run appended to ``kvconvert.json``
and the card (docs/heal.md). It is written atomically, once, at the end of a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import card as card_mod
from .. import report as report_mod
from ..errors import KVConvertError
from ..source import TensorSource
from ..writer import atomic_output, write_json
from .models import Models


def final_tensors(models: Models) -> dict[str, torch.Tensor]:
    """Checkpoint name -> healed tensor, for every tensor that training changed."""
    out = {}
    if models.lora:
        for name, mod in models.lora.items():
            key = f"{name}.weight"
            base = models.tensors.get(key).float()  # the exact stored weight, not a cast copy
            out[key] = base + mod.delta_weight().cpu()
    else:
        for name, p in models.trainable.items():
            out[name] = p.detach().float().cpu()
    missing = [n for n in out if n not in models.tensors]
    if missing:
        raise KVConvertError(
            f"trained tensors {', '.join(missing[:3])} have no counterpart in "
            f"{models.tensors.folder}'s checkpoint; cannot write them back"
        )
    return out


def write_healed(
    output: Path,
    overwrite: bool,
    converted: TensorSource,
    final: dict[str, torch.Tensor],
    entry: dict[str, Any],
    fidelity: dict[str, Any] | None,
) -> None:
    """Write ``converted``'s folder to ``output`` with ``final``'s tensors in place of its
    own, every other file copied unchanged; ``entry`` is the run's report (appended to
    ``kvconvert.json`` and the card), ``fidelity`` the held-out KL for the card (or None)."""
    folder = converted.folder
    with atomic_output(output, overwrite) as work:
        weight_files = set()
        for f in converted.files:
            weight_files.add(f.name)
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {"format": "pt"}
                tensors = {}
                for name in h.keys():
                    t = h.get_tensor(name)
                    tensors[name] = final[name].to(t.dtype) if name in final else t
            save_file(tensors, str(work / f.name), metadata=meta)
            del tensors
        for p in sorted(folder.iterdir()):
            if p.name in weight_files or p.name.startswith("."):
                continue
            if p.is_dir():
                shutil.copytree(p, work / p.name)
            elif p.name not in ("kvconvert.json",):
                shutil.copy2(p, work / p.name)
        rep_path = folder / "kvconvert.json"
        rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
        rep.setdefault("kvconvert_report", 1)
        rep.setdefault("heal", []).append(entry)
        write_json(work / "kvconvert.json", rep)
        card = work / "README.md"
        if card.is_file():
            card.write_text(card.read_text().rstrip("\n") + "\n\n" + card_section(entry))
        if fidelity is not None:  # the card agrees
            card_mod.record_fidelity(work, fidelity)
        card_mod.refresh_card(work, json.loads((work / "kvconvert.json").read_text()))


def card_section(entry: dict[str, Any]) -> str:
    """The card's "Healing" section, from the run's report entry."""
    kl = ""
    if entry["kl_before"] is not None:
        kl = (
            f" KL to the original on {entry['data']['eval_sequences']} held-out sequences: "
            f"{entry['kl_before']:.4f} -> {entry['kl_after']:.4f} nats/token."
        )
    kept = ""
    if entry.get("kept", "healed") != "healed":
        kept = " The held-out KL did not drop, so these weights are the unhealed ones."
    return (
        "## Healing\n\n"
        f"Distilled from the original for {entry['steps']} steps ({entry['trained']['mode']}, "
        f"training text `{entry['data']['source']}`, {entry['data']['tokens_seen']} tokens)."
        f"{kl}{kept}\n\n```\n{report_mod.reproducible_command(entry['command'])}\n```\n"
    )
