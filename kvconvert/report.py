"""What a conversion records about itself: ``kvconvert.json`` and the README model card."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import shlex
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .compat import NEWEST_TESTED_TRANSFORMERS, OLDEST_TRANSFORMERS
from .recipe import HUB_ID, RUN_SETTINGS, Recipe, recipe_to_yaml
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
        "recipe": {k: v for k, v in recipe.to_dict().items() if k not in RUN_SETTINGS},
        "run": {k: getattr(recipe, k) for k in RUN_SETTINGS},  # how it ran, not what it made
        "versions": versions(),
        "source": {
            "model": recipe.model,
            "local": local_source(recipe),
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
        f"kvconvert recipe: {reproducible_command(report['command'])}\n"
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
    (work / "README.md").write_text(without_local_paths(card, recipe, report))


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


def without_local_paths(
    text: str, recipe: Recipe | None = None, report: dict[str, Any] | None = None
) -> str:
    """``text`` with every local path (the source and output folders, data files, paths typed
    in recorded commands; as typed, expanded and absolute) replaced by its last component:
    cards are published, the converting machine's folders are not (docs/publishing.md)."""
    paths: set[str] = set()
    if recipe is not None:
        paths |= {recipe.output} | ({recipe.model} if local_source(recipe) else set())
    if report is not None:
        paths |= local_paths(report)
    return _replace_paths(text, paths)


#: A path boundary: the characters a file or folder name can continue with.
_NAME_CHAR = r"[\w.~+-]"


def _replace_paths(text: str, paths: set[str]) -> str:
    names: dict[str, str] = {}
    for typed in filter(None, paths):
        path = Path(typed).expanduser()
        name = path.resolve().name or path.name
        for form in {typed, typed.rstrip("/"), str(path), str(path.resolve())}:
            if "/" in form and form.strip("/"):  # a bare name is already just a name
                names[form] = name
    for form in sorted(names, key=len, reverse=True):
        pattern = rf"(?<!{_NAME_CHAR}){re.escape(form)}/?(?!{_NAME_CHAR})"
        text = re.sub(pattern, lambda _m, n=names[form]: n, text)
    return text


def local_paths(report: dict[str, Any]) -> set[str]:
    """Every local path a report names: the recipe's source (when local), output, calibration
    and map files, heal runs' folders, and each path-like word of every recorded command."""
    found: set[str] = set()
    recipe, source = report.get("recipe") or {}, report.get("source") or {}
    for key in ("output", "calibration", "pod_map"):
        if isinstance(recipe.get(key), str) and _is_local(recipe[key], known=key == "output"):
            found.add(recipe[key])
    model = recipe.get("model")
    if isinstance(model, str) and (source.get("local") or _is_local(model)):
        found.add(model)
    for entry in report.get("heal") or []:
        opts = entry.get("options") or {}
        for key in ("original", "converted", "output"):
            if isinstance(opts.get(key), str) and _is_local(opts[key], known=key == "output"):
                found.add(opts[key])
    for text in _strings(report):
        for word in _words(text):
            if _is_local(word):
                found.add(word)
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _words(text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    return [w.split("=", 1)[1] if w.startswith("--") and "=" in w else w for w in words]


def _is_local(word: str, known: bool = False) -> bool:
    """Whether ``word`` names a path on this machine rather than a Hub id (``org/name``)."""
    if not word or word.startswith(("http://", "https://")):
        return False
    if known or word.startswith(("/", "~", "./", "../")):
        return True
    return "/" in word and Path(word).expanduser().exists()


#: Flags of how a run is executed besides the Recipe's RUN_SETTINGS (docs/recipes.md): heal's
#: and the CLI's own. Left out, with those, of the command a card shows, which must reproduce
#: the output anywhere. Flags that take a value, then bare flags.
OTHER_RUN_FLAGS_WITH_VALUE = ("--teacher-device", "--save-every", "--push-to-hub", "--hub-revision")
OTHER_RUN_FLAGS = ("--overwrite", "--private", "--quiet", "-q")


def run_flags() -> tuple[set[str], set[str]]:
    """(flags that take a value, bare flags) that say how a run is executed: the Recipe's
    RUN_SETTINGS as the CLI spells them (a boolean also as --no-...), and the others above."""
    valued, bare = set(OTHER_RUN_FLAGS_WITH_VALUE), set(OTHER_RUN_FLAGS)
    for name in RUN_SETTINGS:
        flag = "--" + name.replace("_", "-")
        if Recipe.__dataclass_fields__[name].default is False:
            bare |= {flag, "--no-" + flag[2:]}
        else:
            valued.add(flag)
    return valued, bare


def reproducible_command(command: str) -> str:
    """``command`` without its run settings (``--resume``, ``--device``, ``--threads`` ...)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    if not words or Path(words[0]).name not in ("kvconvert", "__main__.py", "kvconvert.cli"):
        return command
    valued, bare = run_flags()
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in bare or word.split("=", 1)[0] in valued:
            skip = word in valued  # the value is the next word
        else:
            out.append(word)
    return shlex.join(out)


def publishable(folder: Path) -> dict[str, bytes]:
    """What ``push`` uploads in place of an output's ``README.md``, ``recipe.yaml`` and
    ``kvconvert.json``: the same files without a local path (docs/publishing.md).

    The recipe names the source by its Hub id where one is known (``base_model``), else by a
    placeholder with a comment saying what to put there; other paths become their names.
    """
    rep_path = folder / "kvconvert.json"
    report = json.loads(rep_path.read_text())
    paths = local_paths(report) | {str(folder), str(folder.resolve())}
    out: dict[str, bytes] = {}
    recipe_path = folder / "recipe.yaml"
    if recipe_path.is_file():
        hub_id = source_card_metadata(folder).get("base_model")  # what the card names
        text = publishable_recipe(recipe_path.read_text(), report, paths, hub_id)
        out["recipe.yaml"] = text.encode()
    clean = json.loads(_replace_paths(json.dumps(report), paths))
    out["kvconvert.json"] = (json.dumps(clean, indent=2) + "\n").encode()
    card = folder / "README.md"
    if card.is_file():
        out["README.md"] = _replace_paths(card.read_text(), paths).encode()
    return {name: data for name, data in out.items() if data != (folder / name).read_bytes()}


def publishable_recipe(
    text: str, report: dict[str, Any], paths: set[str], hub_id: str | None
) -> str:
    """``recipe.yaml`` as pushed: a local source becomes ``base_model`` (the Hub id the card
    names) or a placeholder to fill in; the remaining local paths become their names."""
    model = (report.get("recipe") or {}).get("model")
    if isinstance(model, str) and model in paths:
        if isinstance(hub_id, str) and HUB_ID.match(hub_id):
            line = f"model: {hub_id}  # the Hub id of the local folder converted"
        else:
            name = Path(model).name
            line = (
                f"model: null  # converted from a local folder ({name}): give the source "
                "model as MODEL on the command line"
            )
        text = re.sub(r"(?m)^model: .*$", lambda _m: line, text, count=1)
    return _replace_paths(text, paths)


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
    name = title_name(src, base_model)
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
        *serving_lines(tgt),
        "",
        *reproduce_lines(report, recipe_yaml),
    ]
    lines += ["", "Per-layer details (groups, errors, timings) are in `kvconvert.json`.", ""]
    return "\n".join(lines)


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


def _how_to_load(remote_code: bool, deci: bool = False) -> list[str]:
    if deci:
        intro = (
            "The layers keep different numbers of KV heads, in the DeciLM / Nemotron-NAS layout "
            "(`DeciLMForCausalLM`, `block_configs` in `config.json`) that serving engines read "
            "(below). For transformers the checkpoint ships its own modeling code (thin, on "
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
        f"tokenizer = AutoTokenizer.from_pretrained(repo{arg})  # when the source had one",
        "```",
        *TOKENIZER_NOTE * bool(arg),
    ]


#: Which serving engines run each kind of GQA output (docs/serving.md has the measurements).
SERVING = {
    "stock": "vLLM, SGLang and llama.cpp serve it as the source architecture.",
    "deci": "vLLM serves it as `DeciLMForCausalLM` (`vllm serve FOLDER --trust-remote-code`); "
    "llama.cpp's "
    "converter writes a `deci` GGUF with per-layer KV heads (run it with flash attention on).",
    "family": "vLLM serves it through its Transformers backend (`vllm serve FOLDER "
    "--trust-remote-code`); llama.cpp has no grouped-query attention for this architecture.",
    "kvconvert": "Only transformers runs it: its attention is kvconvert's own model code, which "
    "engines that bring their own attention kernels and KV cache cannot run. vLLM stops at "
    "start-up with that reason rather than serve a different model. For vLLM or llama.cpp, "
    "convert to the DeciLM layout instead (`--format auto`, without `--rope-keys project`).",
}
ENGINE_CHECK = (
    "`kvconvert check FOLDER --engine vllm` compares your vLLM with transformers on this "
    "checkpoint (greedy tokens, prompt log-probs, KV capacity)."
)


def serving_lines(target: dict[str, Any]) -> list[str]:
    """The card's paragraph on serving engines for a GQA output."""
    layout = target.get("format", "stock")
    if layout == "kvconvert" and target.get("model_code"):
        layout = "family"
    return [f"**Serving.** {SERVING.get(layout, SERVING['kvconvert'])} {ENGINE_CHECK}"]


#: Why the tokenizer line passes trust_remote_code too (docs/serving.md).
TOKENIZER_NOTE = [
    "",
    "The tokenizer is the source's, unchanged; `AutoTokenizer` reads `config.json` first, so "
    "without `trust_remote_code=True` it asks whether to run this folder's configuration code.",
]
