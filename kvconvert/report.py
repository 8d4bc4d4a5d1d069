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

from .recipe import HUB_ID, RUN_SETTINGS, Recipe, recipe_to_yaml

if TYPE_CHECKING:
    from .source import Source

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def dtype_scale(name: Any, size: int) -> float | None:
    """How many times bigger an element of ``size`` bytes is than one of the dtype a report
    names (None: a name it does not know)."""
    have = DTYPE_BYTES.get(str(name))
    return None if have is None else size / have


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
