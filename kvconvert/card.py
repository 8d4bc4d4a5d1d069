"""The README.md model card every output carries: front matter, what was done, fidelity,
how to load, serving, how to redo. Each target writes its own sections (``gqa/card.py``,
``pod/card.py``) into :func:`model_card`; measurements and healing update a card in place
(:func:`record_fidelity`, :func:`refresh_card`)."""

from __future__ import annotations

import importlib.metadata as md
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compat import NEWEST_TESTED_TRANSFORMERS, OLDEST_TRANSFORMERS
from .report import reproducible_command, without_local_paths
from .writer import write_json

#: Front-matter keys carried over from the source's model card (licence terms bind the output).
CARRIED_KEYS = ("license", "license_name", "license_link", "extra_gated_prompt", "language")


@dataclass
class CardParts:
    """What a target writes into its outputs' cards: ``title`` (after the model's name),
    ``body`` (what was done), ``how_to_load`` (see :func:`load_lines`), ``serving`` (which
    engines run it), and a ``footer``."""

    title: str
    body: list[str]
    how_to_load: list[str]
    serving: str
    footer: tuple[str, ...] = ()


def model_card(
    report: dict[str, Any],
    base_model: str | None,
    parts: CardParts,
    source_card: dict[str, Any] | None = None,
    recipe_yaml: str | None = None,
) -> str:
    """A card from a target's ``parts``; the fidelity and reproduce sections come from the
    report. ``source_card``'s licence is carried over."""
    from huggingface_hub import ModelCardData

    kind = report["target"].get("kind", report["recipe"].get("target"))
    carried = {k: v for k, v in (source_card or {}).items() if k in CARRIED_KEYS and v}
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["kvconvert", kind],
        **carried,
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {title_name(report['source'], base_model)}{parts.title}",
        "",
        *parts.body,
        "",
        "## Fidelity",
        "",
        *fidelity_lines(report),
        "",
        "## How to load",
        "",
        *parts.how_to_load,
        "",
        f"**Serving.** {parts.serving} {ENGINE_CHECK}",
        "",
        *reproduce_lines(report, recipe_yaml),
        "",
        *parts.footer,
    ]
    return "\n".join(lines)


def load_lines(intro: str, remote_code: bool, maybe_tokenizer: bool = True) -> list[str]:
    """The card's "How to load" section: ``intro``, the tested versions, the code
    (``maybe_tokenizer``: say that the tokenizer is there only where the source had one)."""
    arg = ", trust_remote_code=True" if remote_code else ""
    note = "  # when the source had one" if maybe_tokenizer else ""
    return [
        intro,
        "",
        tested_versions(),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'repo = "this-repo-id-or-folder"',
        f"model = AutoModelForCausalLM.from_pretrained(repo{arg})",
        f"tokenizer = AutoTokenizer.from_pretrained(repo{arg}){note}",
        "```",
        *TOKENIZER_NOTE * remote_code,
    ]


ENGINE_CHECK = (
    "`kvconvert check FOLDER --engine vllm` compares your vLLM with transformers on this "
    "checkpoint (greedy tokens, prompt log-probs, KV capacity)."
)


def title_name(source: dict[str, Any], base_model: str | None) -> str:
    """The model's name for a card's title: the Hub id's name where known (a local folder is
    often called just ``model``), else the source folder's name."""
    if base_model:
        return base_model.rstrip("/").split("/")[-1]
    return str(source["model"]).rstrip("/").split("/")[-1]


def reproduce_lines(report: dict[str, Any], recipe_yaml: str | None) -> list[str]:
    """A card's "Reproduce" section: the commands (without run settings such as --resume)
    and the recipe, saying which weights the recipe reproduces when the output was healed."""
    heals = [h for h in report.get("heal") or [] if isinstance(h, dict)]
    command = reproducible_command(report["command"])
    healed_by = [reproducible_command(h.get("command") or "") for h in heals]
    one_run = bool(heals) and healed_by == [command]  # --heal-steps: converted and healed
    if one_run:
        intro, what = (
            "The command that produced this folder (it converts, then heals):",
            "the converted weights before healing (heal_steps 0; the command above heals)",
        )
    elif heals:
        intro, what = (
            "The command that converted (before healing):",
            "the converted weights before healing (then heal them as above)",
        )
    else:
        intro, what = "The command that produced this folder:", "these weights byte for byte"
    lines = ["## Reproduce", "", intro, "", "```bash", command, "```"]
    for heal_command in [] if one_run else healed_by:
        lines += ["", "Then healed with:", "", "```bash", heal_command, "```"]
    if recipe_yaml:
        lines += [
            "",
            "The full recipe (`recipe.yaml` in this folder); `kvconvert --recipe recipe.yaml "
            f"-o OUT` reproduces {what} from the same source:",
            "",
            "```yaml",
            recipe_yaml.rstrip(),
            "```",
        ]
    return lines


def refresh_card(folder: Path, report: dict[str, Any]) -> None:
    """Bring a card's "Reproduce" section up to date with ``report`` (after healing) and take
    out every local path; the rest of the card is kept as written."""
    card_path = folder / "README.md"
    if not card_path.is_file():
        return
    recipe = folder / "recipe.yaml"
    text = recipe.read_text() if recipe.is_file() else None
    section = "\n".join(reproduce_lines(report, text)) + "\n"
    card = card_path.read_text()
    card = replace_section(card, "## Reproduce", section, "\nPer-layer details") or card
    card_path.write_text(without_local_paths(card, report=report))


def replace_section(card: str, heading: str, section: str, end: str = "\n## ") -> str | None:
    """``card`` with the section under ``heading`` (up to the next heading, or ``end`` if that
    comes first) replaced by ``section``; None where the card has no such section."""
    start = card.find(heading + "\n")
    if start < 0:
        return None
    stops = [card.find(mark, start + 1) for mark in ("\n## ", end)]
    cut = min([x for x in stops if x >= 0] or [len(card)])
    return card[:start] + section + card[cut:]


def fidelity_lines(report: dict[str, Any]) -> list[str]:
    """The measured fidelity, if the report carries one (``fidelity`` / ``evaluation``)."""
    measured = report.get("fidelity") or report.get("evaluation")
    if not isinstance(measured, dict) or not measured:
        return [
            "No fidelity measurement was recorded with this conversion. A smaller KV cache "
            "changes the model's outputs: measure KL and perplexity against the original on "
            "your own data before deploying (`kvconvert eval ORIGINAL THIS --record` writes "
            "them here)."
        ]
    rows = ["| measure | value |", "|---|---|"]
    for key, value in measured.items():
        if key in ("measured_by", "command"):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            continue
        rows.append(f"| {key.replace('_', ' ')} | {value} |")
    by = measured.get("measured_by", "the conversion")
    lines = [f"Measured by {by} (details in `kvconvert.json`):", "", *rows]
    if measured.get("command"):
        lines += ["", "```bash", measured["command"], "```"]
    return lines


def record_fidelity(folder: Path, measured: dict[str, Any]) -> None:
    """Put a measurement into an output: ``kvconvert.json`` "evaluation", and the model card's
    Fidelity section (replaced, or added before "How to load" where the card has none), so
    the card states what was last measured and never contradicts itself."""
    path = folder / "kvconvert.json"
    rep = json.loads(path.read_text())
    rep["evaluation"] = measured
    write_json(path, rep)
    card_path = folder / "README.md"
    if not card_path.is_file():
        return
    card = card_path.read_text()
    section = "## Fidelity\n\n" + "\n".join(fidelity_lines(rep)) + "\n"
    replaced = replace_section(card, "## Fidelity", section)
    if replaced is None:  # a card without one: add it before "How to load"
        at = card.find("## How to load")
        at = at if at >= 0 else len(card)
        replaced = card[:at] + section + "\n" + card[at:]
    card = replaced
    card_path.write_text(without_local_paths(card, report=rep))


def tested_versions() -> str:
    """The model card's sentence on transformers versions (docs/support.md)."""
    return (
        f"Written with transformers {md.version('transformers')}; kvconvert tests its outputs "
        f"under transformers {OLDEST_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS}. After "
        "upgrading transformers, `kvconvert check FOLDER` says whether this checkpoint still "
        "generates as it should."
    )


#: Why the tokenizer line passes trust_remote_code too (docs/serving.md).
TOKENIZER_NOTE = [
    "",
    "The tokenizer is the source's, unchanged; `AutoTokenizer` reads `config.json` first, so "
    "without `trust_remote_code=True` it asks whether to run this folder's configuration code.",
]
