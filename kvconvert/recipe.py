"""The Recipe: every conversion option in one validated object, built from groups.

Each target declares and checks its own options (``gqa/options.py``, ``pod/options.py``);
healing's are ``HealOptions``' own under a ``heal_`` prefix (``heal/options.py``); how a run is
executed is ``RunSettings``, never written to a recipe file. The CLI parses flags into a
Recipe, the Python API takes the same fields as keyword arguments, and the effective recipe is
recorded in the output's ``kvconvert.json`` and, as a YAML recipe file that ``--recipe`` reads
back, in its ``recipe.yaml``.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import KVConvertError
from .gqa.options import GQAOptions
from .heal.options import IN_CONVERT, SHARED, HealGroup, HealOptions
from .options import DEVICES, DTYPES, check_choices_and_threads, option, parse_size, threads_option
from .pod.options import PodOptions

TARGETS = ("gqa", "pod", "gqa,pod")
#: a Hub repository id, as a model card's base_model names it
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PIPELINES = ("auto", "sequential", "whole")
PROPAGATE = ("original", "converted")


@dataclass
class _What:
    """The source, the output folder and the conversion (first on the command line)."""

    model: str = option(
        None, "Source model: a local folder or a Hub id.", cli="argument", required=False
    )
    output: str = option(None, "Output folder (refused if it exists).", short="-o", required=True)
    target: str = option(
        "gqa",
        "Conversion: gqa merges KV heads; pod shares distant-token keys between layers; "
        "gqa,pod merges heads first, then computes the PoD map on the merged model.",
        TARGETS,
    )


@dataclass
class CalibrationOptions:
    """The data every calibrated target measures on."""

    calibration: str = option(
        "self",
        "'self' (sample from the model from BOS); a file (.txt plain text, .jsonl or .json "
        "with text or input_ids, .parquet) or a folder of them; or a Hub dataset id.",
    )
    num_samples: int = option(32, "Calibration sequences.", type=int)
    seq_len: int = option(256, "Tokens per calibration sequence.", type=int)
    batch_size: int = option(8, "Calibration sequences per forward pass.", type=int)
    seed: int = option(0, "Seed for sampling, shuffling and search.", type=int)
    text_field: str = option("text", "Field holding the text in .jsonl calibration data.")


@dataclass
class OutputOptions:
    """How the output is written and described."""

    dtype: str = option("auto", "Output dtype (auto: keep the source's).", DTYPES)
    max_shard_size: str = option("5GB", "Largest output shard, e.g. 5GB or 500MB.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    base_model: str | None = option(
        None,
        "Hub id the model card names as base_model (default: the source's Hub id; for a local "
        "folder, the Hub id its config.json records, if any). A local path is never published.",
    )
    trust_remote_code: bool = option(
        False, "Allow the source model's own code to run (off by default)."
    )


@dataclass
class EngineOptions:
    """Which engine computes the output, and what its layers calibrate on."""

    pipeline: str = option(
        "auto",
        "sequential: one decoder layer in memory at a time (weights streamed from the shards); "
        "whole: load the whole model for calibration; auto: sequential where supported "
        "(uniform GQA on a Llama-layout model), else whole.",
        PIPELINES,
    )
    propagate: str = option(
        "original",
        "What the next layer sees in --pipeline sequential: the original layer's outputs, or "
        "the converted layer's (errors compensated downstream, one extra layer pass).",
        PROPAGATE,
    )


@dataclass
class RunSettings:
    """How a run is executed, not what it produces: never written to a recipe file
    (``RUN_SETTINGS``), so that a recorded recipe reruns anywhere."""

    device: str = option(
        "auto", "Where calibration and solving run (auto: CUDA if available).", DEVICES
    )
    threads: int | None = threads_option()
    resume: bool = option(
        False, "Continue an interrupted run from its OUTPUT.kvconvert-work folder."
    )
    dry_run: bool = option(
        False, "Print the plan (layers, groups, KV bytes, memory, disk) and exit."
    )
    heal_resume: bool = option(False, "Resume an interrupted healing run (conversion is redone).")
    offload_activations: bool = option(
        False, "Keep calibration activations on the CPU between layers (saves --device memory)."
    )
    overwrite: bool = option(False, "Replace an existing output folder.")


@dataclass
class Recipe(  # the groups' fields come in the reverse of this order
    RunSettings,
    EngineOptions,
    HealGroup,
    OutputOptions,
    CalibrationOptions,
    PodOptions,
    GQAOptions,
    _What,
):
    """All options of a conversion, group by group; each field's metadata is its CLI flag's
    help, in the CLI's and recipe files' order: the groups from the last base up."""

    def validate(self) -> Recipe:
        """Check every field; raise KVConvertError naming the bad option."""
        if not self.model or not self.output:
            raise KVConvertError("model and output are required")
        check_choices_and_threads(self)
        self.check_gqa(self.target)
        for key in ("num_samples", "seq_len", "batch_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
        if self.target in ("pod", "gqa,pod"):
            self.check_pod(self.seq_len, self.heal_steps, self.heal_seq_len)
        if self.seq_len < 2:
            raise KVConvertError("seq_len: must be at least 2")
        parse_size(self.max_shard_size)
        if self.base_model is not None and not HUB_ID.match(self.base_model):
            raise KVConvertError(
                f"base_model: {self.base_model!r} is not a Hub id (user/name or org/name)"
            )
        return self

    def heal_options(self, converted: str) -> HealOptions:
        """The healing options of a ``--heal-steps`` run that heals ``converted`` into this
        recipe's output (healing options not in a recipe keep their defaults)."""
        return HealOptions(
            original=self.model,
            converted=converted,
            output=self.output,
            resume=self.heal_resume,
            **{k: getattr(self, f"heal_{k}") for k in IN_CONVERT},
            **{k: getattr(self, k) for k in SHARED},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# --- recipe files (YAML) --------------------------------------------------------------------
#: Fields that say where to write and what this machine may do, not what to compute: never
#: written to a recipe file and refused when read from one (a downloaded recipe must not turn
#: on remote code or overwrite a folder). Fields opt out too with option(..., in_recipe=False).
LOCAL_ONLY = ("output", "overwrite", "trust_remote_code")
#: How a run is executed, not what it produces (docs/recipes.md): never written to a recipe
#: file, so that a recorded recipe reruns anywhere (a resumed run's recipe must not say
#: resume). Recipe files written before this rule still load: these keys are ignored there,
#: with a note.
RUN_SETTINGS = tuple(f.name for f in fields(RunSettings) if f.name not in LOCAL_ONLY)


def recipe_keys() -> list[str]:
    """The Recipe fields a recipe file may hold, in declaration order."""
    return [
        f.name
        for f in fields(Recipe)
        if f.name not in LOCAL_ONLY
        and f.name not in RUN_SETTINGS
        and f.metadata.get("in_recipe", True)
    ]


def recipe_to_yaml(recipe: Recipe, header: str | None = None) -> str:
    """The recipe as YAML: every recipe key with its effective value, in field order."""
    import yaml

    class Dumper(yaml.SafeDumper):  # one key per line; lists (e.g. per-layer values) inline
        pass

    Dumper.add_representer(
        list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
    )
    data = {k: getattr(recipe, k) for k in recipe_keys()}
    text = yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into {field: value}, checking every key and value's type.

    Keys may be written with underscores or dashes (``kv_heads`` or ``kv-heads``). Values are
    checked against the field types here; allowed values and cross-field rules are checked by
    ``Recipe.validate`` once command-line flags have been applied.
    """
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise KVConvertError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise KVConvertError(f"recipe {path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KVConvertError(f"recipe {path}: expected a mapping of option: value at the top level")
    return recipe_values(data, where=f"recipe {path}")


def recipe_values(data: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """Check a mapping of recipe keys -> values; return it with canonical keys and types."""
    hints = get_type_hints(Recipe)
    allowed = recipe_keys()
    out: dict[str, Any] = {}
    ignored = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in RUN_SETTINGS:  # written by kvconvert < 0.2: how that run ran, not the recipe
            ignored.append(str(raw_key))
            continue
        if key not in allowed:
            if key in Recipe.field_names():
                flag = "--" + key.replace("_", "-")
                raise KVConvertError(
                    f"{where}: key {raw_key!r} cannot be set from a recipe file; "
                    f"give {flag} on the command line"
                )
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise KVConvertError(f"{where}: unknown key {raw_key!r}{hint}")
        if key in out:
            raise KVConvertError(f"{where}: key {raw_key!r} given twice")
        out[key] = _check_type(value, hints[key], f"{where}: {key}")
        choices = Recipe.__dataclass_fields__[key].metadata.get("choices")
        if choices and out[key] not in choices:
            raise KVConvertError(f"{where}: {key}: {out[key]!r} is not one of {', '.join(choices)}")
    if ignored:
        print(
            f"kvconvert: note: {where}: ignoring {', '.join(ignored)} (how a run is executed, "
            "not part of a recipe; give them as flags)",
            file=sys.stderr,
        )
    return out


def _check_type(value: Any, tp: Any, what: str) -> Any:
    """``value`` as type ``tp`` (a Recipe field annotation), or a KVConvertError naming the key."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, what)
            except KVConvertError as e:
                errors.append(str(e).rsplit(": ", 1)[-1])
        raise KVConvertError(f"{what}: {' or '.join(errors)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise KVConvertError(f"{what}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_check_type(v, item, f"{what}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise KVConvertError(f"{what}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise KVConvertError(f"{what}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KVConvertError(f"{what}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KVConvertError(f"{what}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise KVConvertError(f"{what}: expected a string, got {value!r}")
        return str(value)  # YAML reads e.g. a numeric revision as a number
    return value
