"""What a conversion records about itself: ``kvconvert.json`` and the README model card."""

from __future__ import annotations

import importlib.metadata as md
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .compat import NEWEST_TESTED_TRANSFORMERS, OLDEST_TRANSFORMERS
from .recipe import HUB_ID, Recipe, recipe_to_yaml
from .writer import write_json

if TYPE_CHECKING:
    from .source import Source

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("kvconvert", "torch", "transformers", "safetensors", "huggingface_hub"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def report_header(
    recipe: Recipe, src: Source, command: str | None, num_kv_heads: int | None = None
) -> dict[str, Any]:
    """The first keys of every kvconvert.json: command, recipe, versions, source facts."""
    return {
        "kvconvert_report": 1,
        "command": command or "kvconvert.convert(...)",
        "recipe": recipe.to_dict(),
        "versions": versions(),
        "source": {
            "model": recipe.model,
            "revision": recipe.revision,
            "model_type": src.config.get("model_type"),
            "num_key_value_heads": num_kv_heads or src.num_kv_heads,
            "num_attention_heads": src.num_heads,
            "head_dim": src.head_dim,
            "num_layers": src.num_layers,
        },
    }


def write_recipe(work: Path, recipe: Recipe, report: dict[str, Any], source: Path) -> str:
    """``recipe.yaml``: the effective recipe, re-runnable with ``--recipe`` from any
    directory (a local source is stored as an absolute path, which the card never shows; a
    Hub source is pinned to the commit converted). Returns its text."""
    pinned = recipe
    if local_source(recipe):
        pinned = replace(recipe, model=str(Path(recipe.model).expanduser().resolve()))
    elif recipe.revision is None and source.parent.name == "snapshots":
        pinned = replace(recipe, revision=source.name)  # the exact Hub commit converted
    header = (
        f"kvconvert recipe: {report['command']}\n"
        "Re-run: kvconvert --recipe recipe.yaml -o OUT   (flags given override these values)"
    )
    text = recipe_to_yaml(pinned, header=header)
    (work / "recipe.yaml").write_text(text)
    return text


def write_recipe_and_card(
    work: Path, recipe: Recipe, report: dict[str, Any], source: Path, config: dict[str, Any]
) -> None:
    """``recipe.yaml`` (see ``write_recipe``) and the ``README.md`` model card."""
    text = write_recipe(work, recipe, report, source)
    card = model_card(
        report,
        base_model_id(recipe, config),  # the source's keys, _name_or_path included
        source_card=source_card_metadata(source),
        remote_code="auto_map" in config,
        recipe_yaml=text,
    )
    (work / "README.md").write_text(without_local_paths(card, recipe))


def local_source(recipe: Recipe) -> bool:
    """Whether the source is a folder on this machine (else a Hub id)."""
    return Path(recipe.model).expanduser().exists()


def base_model_id(recipe: Recipe, source_config: dict[str, Any]) -> str | None:
    """The Hub id a model card names as ``base_model``: ``--base-model``, else the source's Hub
    id, else the one a local folder's config.json records (``_name_or_path``); never a path."""
    if recipe.base_model:
        return recipe.base_model
    if not local_source(recipe):
        return recipe.model
    recorded = source_config.get("_name_or_path")
    if not isinstance(recorded, str) or not HUB_ID.match(recorded):
        return None
    return None if Path(recorded).expanduser().exists() else recorded


def without_local_paths(text: str, recipe: Recipe) -> str:
    """``text`` with the local source and output paths (as typed, expanded and absolute)
    replaced by their folder names: cards are published, the converting machine's folders
    are not."""
    names: dict[str, str] = {}
    for typed in (recipe.model if local_source(recipe) else None, recipe.output):
        if not typed:
            continue
        path = Path(typed).expanduser()
        for form in {typed, typed.rstrip("/"), str(path), str(path.resolve())}:
            if "/" in form:  # a bare name is already just a name
                names[form] = path.resolve().name
    for form in sorted(names, key=len, reverse=True):
        text = text.replace(form, names[form])
    return text


def kv_bytes_per_token(kv_heads_per_layer: list[int], head_dim: int, dtype: torch.dtype) -> int:
    """Keys + values of every layer for one token, as a dense cache stores them."""
    return 2 * sum(kv_heads_per_layer) * head_dim * torch.empty((), dtype=dtype).element_size()


#: Front-matter keys carried over from the source's model card (licence terms bind the output).
CARRIED_KEYS = ("license", "license_name", "license_link", "extra_gated_prompt", "language")
METHOD_NAMES = {"gqa": "KV-head merging", "pod": "PoD layer key sharing"}


def source_card_metadata(folder: Path) -> dict[str, Any]:
    """The YAML front matter of the source's README.md ({} when absent or unreadable)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub.repocard import metadata_load

        return metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - a broken source card must not stop a conversion
        return {}


def model_card(
    report: dict[str, Any],
    base_model: str | None,
    *,
    source_card: dict[str, Any] | None = None,
    remote_code: bool = False,
    recipe_yaml: str | None = None,
) -> str:
    """README.md for the output: Hub metadata, what was done, fidelity, how to load, how to redo.

    ``source_card`` is the source README's front matter (its licence is carried over);
    ``remote_code`` says whether the output needs ``trust_remote_code=True``.
    """
    from huggingface_hub import ModelCardData

    src, tgt = report["source"], report["target"]
    kind = tgt.get("kind", report["recipe"].get("target", "gqa"))
    carried = {k: v for k, v in (source_card or {}).items() if k in CARRIED_KEYS and v}
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["kvconvert", kind],
        **carried,
    )
    name = src["model"].rstrip("/").split("/")[-1]
    origin = (
        f"[`{base_model}`](https://huggingface.co/{base_model})"
        if base_model
        else (f"`{src['model']}`")
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}: {_headline(kind, src, tgt)}",
        "",
        f"Converted from {origin} by kvconvert "
        f"{report.get('versions', {}).get('kvconvert', '')} to shrink the KV cache.",
        "",
        "## What was done",
        "",
        *_what_was_done(report, kind),
        "",
        "## Fidelity",
        "",
        *fidelity_lines(report),
        "",
        "## How to load",
        "",
        *_how_to_load(remote_code, deci=tgt.get("format") == "deci"),
        "",
        "## Reproduce",
        "",
        "The command that produced this folder:",
        "",
        "```bash",
        report["command"],
        "```",
    ]
    if recipe_yaml:
        lines += [
            "",
            "The full recipe (`recipe.yaml` in this folder); `kvconvert --recipe recipe.yaml "
            "-o OUT` reproduces these weights byte for byte from the same source:",
            "",
            "```yaml",
            recipe_yaml.rstrip(),
            "```",
        ]
    lines += ["", "Per-layer details (groups, errors, timings) are in `kvconvert.json`.", ""]
    return "\n".join(lines)


def _heads(value: Any) -> str:
    if isinstance(value, list):
        return "/".join(map(str, value)) if len(set(value)) > 1 else str(value[0])
    return str(value)


def _headline(kind: str, src: dict[str, Any], tgt: dict[str, Any]) -> str:
    if kind == "gqa" and "num_key_value_heads" in tgt:
        return f"{_heads(tgt['num_key_value_heads'])} KV heads (from {src['num_key_value_heads']})"
    return METHOD_NAMES.get(kind, kind)


def _what_was_done(report: dict[str, Any], kind: str) -> list[str]:
    src, tgt, recipe = report["source"], report["target"], report["recipe"]
    out = [f"- Method: {METHOD_NAMES.get(kind, kind)} (`--target {kind}`)."]
    if kind == "gqa" and "num_key_value_heads" in tgt:
        out.append(
            f"- KV heads per layer: {src['num_key_value_heads']} -> "
            f"{_heads(tgt['num_key_value_heads'])} (of {src['num_attention_heads']} query heads, "
            f"{src['num_layers']} layers); merge `{recipe.get('method')}`, RoPE keys "
            f"`{recipe.get('rope_keys')}`, objective `{recipe.get('objective')}`, grouping "
            f"`{recipe.get('grouping')}`."
        )
    for key, value in tgt.items():
        if key not in ("kind", "num_key_value_heads") and not isinstance(value, (dict, list)):
            out.append(f"- {key.replace('_', ' ')}: `{value}`")
    kvb = report.get("kv_bytes_per_token")
    if kvb and kvb.get("before"):
        saving = 1 - kvb["after"] / kvb["before"]
        out.append(
            f"- KV cache per token ({kvb.get('dtype', '')}): {kvb['before']:,} bytes -> "
            f"{kvb['after']:,} bytes ({saving:.0%} smaller)."
        )
    cal = report.get("calibration")
    if cal:
        size = f", {cal['sequences']} x {cal['seq_len']} tokens" if cal.get("sequences") else ""
        out.append(f"- Calibration: {cal['source']}{size}.")
    layers = [r for r in report.get("layers", []) if "key_error" in r]
    if layers:
        k = [r["key_error"] for r in layers]
        v = [r["value_error"] for r in layers]
        out.append(
            "- Relative reconstruction error (0 = exact): keys mean "
            f"{sum(k) / len(k):.3f}, worst {max(k):.3f}; values mean {sum(v) / len(v):.3f}, "
            f"worst {max(v):.3f}."
        )
    return out


def fidelity_lines(report: dict[str, Any]) -> list[str]:
    """The measured fidelity, if the report carries one (``fidelity`` / ``evaluation``)."""
    measured = report.get("fidelity") or report.get("evaluation")
    if not isinstance(measured, dict) or not measured:
        return [
            "No fidelity measurement was recorded with this conversion. Merging KV heads costs "
            "quality: measure KL and perplexity against the original on your own data before "
            "deploying (`kvconvert eval ORIGINAL THIS --record` writes them here)."
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
    start = card.find("## Fidelity\n")
    if start >= 0:
        end = card.find("\n## ", start + 1)
        card = card[:start] + section + (card[end:] if end >= 0 else "")
    else:
        at = card.find("## How to load")
        at = at if at >= 0 else len(card)
        card = card[:at] + section + "\n" + card[at:]
    card_path.write_text(card)


def tested_versions() -> str:
    """The model card's sentence on transformers versions (docs/support.md)."""
    return (
        f"Written with transformers {md.version('transformers')}; kvconvert tests its outputs "
        f"under transformers {OLDEST_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS}. After "
        "upgrading transformers, `kvconvert check FOLDER` says whether this checkpoint still "
        "generates as it should."
    )


def _how_to_load(remote_code: bool, deci: bool = False) -> list[str]:
    if deci:
        intro = (
            "The layers keep different numbers of KV heads, in the DeciLM / Nemotron-NAS layout "
            "(`DeciLMForCausalLM`, `block_configs` in `config.json`) that vLLM serves "
            "(`vllm serve FOLDER --trust-remote-code`) and llama.cpp's `convert_hf_to_gguf.py` "
            "converts. For transformers the checkpoint ships its own modeling code (thin, on "
            "the stock Llama classes); load it with `trust_remote_code=True` (transformers 5):"
        )
        arg = ", trust_remote_code=True"
    elif remote_code:
        intro = (
            "This checkpoint ships its own modeling code (`auto_map` in `config.json`); load it "
            "with `trust_remote_code=True` (transformers 5):"
        )
        arg = ", trust_remote_code=True"
    else:
        intro = (
            "An ordinary grouped-query-attention checkpoint of the source architecture: the stock "
            "transformers classes, vLLM, TGI and other GQA-aware stacks load it as-is, no remote "
            "code:"
        )
        arg = ""
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
        "tokenizer = AutoTokenizer.from_pretrained(repo)  # when the source had one",
        "```",
    ]
