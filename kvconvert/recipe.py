"""The Recipe: every conversion option in one validated object.

The CLI parses flags into a Recipe, the Python API takes the same fields as keyword
arguments, and the effective recipe is recorded in the output's ``kvconvert.json`` and, as a
YAML recipe file that ``--recipe`` reads back, in its ``recipe.yaml``.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import KVConvertError
from .gqa.names import GROUPINGS, METHODS

TARGETS = ("gqa", "pod", "gqa,pod")
#: a Hub repository id, as a model card's base_model names it
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ROPE_KEYS = ("complex", "real", "project")
FORMATS = ("auto", "deci", "kvconvert")
SENSITIVITIES = ("measured", "fisher")
OBJECTIVES = ("output", "plain")
PIPELINES = ("auto", "sequential", "whole")
PROPAGATE = ("original", "converted")
MAP_BY = ("auto", "cost", "similarity")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SIZE_UNITS = {
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, **extra: Any) -> Any:
    """A Recipe field carrying its CLI help text and allowed values (the CLI is built from it)."""
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


def threads_option() -> Any:
    """The ``--threads`` field every command's options share (convert, heal, eval)."""
    return option(
        None,
        "CPU threads torch uses (default: torch's choice, one per core). On a shared or busy "
        "machine fewer threads can be much faster; OMP_NUM_THREADS is honoured too.",
        type=int,
    )


@dataclass
class Recipe:
    """All options of a conversion; each field's metadata is its CLI flag's help."""

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
    kv_heads: int | None = option(
        None, "KV heads per layer after merging; must divide the current count.", type=int
    )
    kv_heads_per_layer: str | None = option(
        None,
        "Comma-separated KV heads for each layer, e.g. 4,2,2,1,1 (each divides the current "
        "count); instead of --kv-heads. Non-uniform counts need trust_remote_code to load.",
    )
    kv_budget: float | None = option(
        None,
        "Fraction of the KV cache to keep, e.g. 0.5; each layer's head count is chosen from "
        "its measured sensitivity (least total KL). Instead of --kv-heads.",
        type=float,
    )
    budget_samples: int = option(
        8, "Calibration sequences used to measure layer sensitivities for --kv-budget.", type=int
    )
    budget_sensitivity: str = option(
        "measured",
        "How --kv-budget finds each layer's sensitivity: measured runs a forward pass per layer "
        "and candidate head count (exact); fisher estimates all of them from one forward and "
        "four backward passes (noisier; worth it when layers x candidates is large).",
        SENSITIVITIES,
    )
    format: str = option(
        "auto",
        "Layout of a per-layer output (KV heads differ between layers): deci is the "
        "DeciLM/Nemotron-NAS layout that vLLM and llama.cpp load; kvconvert is kvconvert's own "
        "model code (also carries --rope-keys project). auto: deci where the model fits it, "
        "else kvconvert, saying why. Uniform outputs are always the stock architecture.",
        FORMATS,
    )
    method: str = option(
        "svd",
        "mean: average the group (baseline); svd-weights: SVD of the weights, no data; "
        "svd: eigendecomposition of calibration activations.",
        METHODS,
    )
    rope_keys: str = option(
        "complex",
        "complex: per-frequency complex merge that commutes with RoPE (exact fold); "
        "real: real PCA that ignores RoPE (baseline, not exact); project: the GQA paper's "
        "PCA of keys after RoPE, applied at run time (remote code, full-width k_proj).",
        ROPE_KEYS,
    )
    objective: str = option(
        "output",
        "output: weigh values by o_proj and keys by the queries that read them; plain: unweighted.",
        OBJECTIVES,
    )
    refine_steps: int | None = option(
        None,
        "Adam steps that fit each merged layer's attention to the original's outputs on the "
        "calibration activations, starting from the merge (0: off). Default: 50 where the run "
        "calibrates (--method svd, --kv-budget) on a llama/mistral/qwen2 model, else 0.",
        type=int,
    )
    refine_lr: float | None = option(
        None,
        "Peak step of --refine-steps relative to each tensor's RMS (default 0.02).",
        type=float,
    )
    refine_rows: int = option(
        64,
        "Query positions per calibration sequence that each refinement step fits, drawn at "
        "random (keys: every position up to them); 0: every position, the fit before 0.2 "
        "(on SmolLM2: 3.4x the conversion time, for KL 0.653 instead of 0.673).",
        type=int,
    )
    grouping: str = option(
        "adjacent", "adjacent heads, or search the grouping that loses least per layer.", GROUPINGS
    )
    sink: int = option(
        16, "PoD: the first N tokens of a sequence are always proximal (own keys).", type=int
    )
    recent: int | None = option(
        None,
        "PoD: keys at most N positions before a query are proximal (own keys); older ones "
        "are distant and read through the block bottom's keys. Upper layers cache sink + N keys. "
        "Default: the model's context / 8 - sink (the paper's 4080 at 32K), at most --seq-len / 2 "
        "- sink so that calibration sees distant tokens; the report says which bound chose it.",
        type=int,
    )
    threshold: float = option(
        0.5,
        "PoD: a layer joins the block below while their distant-attention similarity "
        "(1 - JSD, 0..1) is at least this. Not used with --kv-saving or --pod-map.",
        type=float,
    )
    kv_saving: float | None = option(
        None,
        "PoD: target KV-cache saving (fraction below 0.5) at --context tokens; the map is "
        "chosen by --map-by. Overrides --threshold.",
        type=float,
    )
    map_by: str = option(
        "auto",
        "PoD: how --kv-saving picks the layers that borrow keys. cost: the map with the least "
        "summed borrowing cost (each head's output error, on calibration data, when it reads "
        "a lower layer's keys); similarity: the most similar consecutive layers first (1 - "
        "JSD of distant-token attention). auto: cost with --kv-saving, similarity with "
        "--threshold.",
        MAP_BY,
    )
    context: int | None = option(
        None,
        "PoD: the context length --kv-saving is the saving at, and the reported saving's "
        "(default: the model's maximum context, at most 32768; --seq-len where it declares "
        "none).",
        type=int,
    )
    max_block: int | None = option(
        None, "PoD: most layers in one block (default: no limit).", type=int
    )
    keep_first: int = option(0, "PoD: the first N layers never borrow keys.", type=int)
    distant_bias: str | None = option(
        None,
        "PoD: comma-separated biases, e.g. 0,-1,-2,-4; each borrowing head gets the one with "
        "the least borrowing cost, added to the logits of the distant tokens it scores with "
        "borrowed keys (negative: it leans on its own proximal keys). Needs --kv-saving "
        "(map by cost). Default: no bias (docs/pod.md, Distant bias).",
    )
    pod_map: str | None = option(
        None,
        "PoD: JSON file with the layer map, [[bottom layer per KV head] per layer] (or a "
        "previous output's config.json); skips calibration.",
    )
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
    device: str = option(
        "auto", "Where calibration and solving run (auto: CUDA if available).", DEVICES
    )
    dtype: str = option("auto", "Output dtype (auto: keep the source's).", DTYPES)
    threads: int | None = threads_option()
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
    overwrite: bool = option(False, "Replace an existing output folder.")
    heal_steps: int = option(
        0,
        "After converting, heal by distillation from the original for N steps (0: off); "
        "see kvconvert heal for every healing option.",
        type=int,
    )
    heal_train: str = option(
        "attention",
        "Healing trains the converted tensors (attention) or everything (all).",
        ("attention", "all"),
    )
    heal_lora: int = option(
        0, "Heal with rank-R LoRA on the converted projections, merged back (0: off).", type=int
    )
    heal_lr: float | None = option(
        None, "Healing peak learning rate (default: 0.64 / hidden_size).", type=float
    )
    heal_final_lr: float = option(
        0.1, "Where healing's cosine lr decay ends, as a fraction of the peak.", type=float
    )
    heal_batch_size: int | None = option(
        None, "Healing sequences per step (default: 1024 tokens' worth).", type=int
    )
    heal_seq_len: int | None = option(
        None,
        "Healing tokens per sequence (default: 128; 4 x (sink + recent) for PoD).",
        type=int,
    )
    heal_num_samples: int = option(2048, "Healing training sequences from --calibration.", type=int)
    heal_resume: bool = option(False, "Resume an interrupted healing run (conversion is redone).")
    # --- layer-sequential engine, resume, dry run ------------------------------------------
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
    offload_activations: bool = option(
        False, "Keep calibration activations on the CPU between layers (saves --device memory)."
    )
    resume: bool = option(
        False, "Continue an interrupted run from its OUTPUT.kvconvert-work folder."
    )
    dry_run: bool = option(
        False, "Print the plan (layers, groups, KV bytes, memory, disk) and exit."
    )

    def validate(self) -> Recipe:
        """Check every field; raise KVConvertError naming the bad option."""
        if not self.model or not self.output:
            raise KVConvertError("model and output are required")
        check_choices_and_threads(self)
        given = [
            k
            for k in ("kv_heads", "kv_heads_per_layer", "kv_budget")
            if getattr(self, k) is not None
        ]
        if self.target == "gqa" and len(given) != 1:
            raise KVConvertError(
                "kv_heads: --target gqa needs --kv-heads N, or instead exactly one of "
                "--kv-heads-per-layer LIST, --kv-budget FRACTION"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.target == "gqa,pod" and (given != ["kv_heads"] or self.rope_keys == "project"):
            raise KVConvertError(
                "kv_heads: --target gqa,pod needs --kv-heads N (uniform heads; per-layer budgets "
                "and --rope-keys project are not combined with PoD)"
            )
        if self.format != "auto" and self.target != "gqa":
            raise KVConvertError(f"format: --format applies to --target gqa, not {self.target}")
        if self.format == "deci" and (self.kv_heads is not None or self.rope_keys == "project"):
            raise KVConvertError(
                "format: --format deci is for per-layer KV heads (--kv-budget, "
                "--kv-heads-per-layer) without --rope-keys project; with --kv-heads N every "
                "layer keeps N heads and the output is the stock architecture"
            )
        if self.refine_steps is not None and (
            not isinstance(self.refine_steps, int) or self.refine_steps < 0
        ):
            got = self.refine_steps
            raise KVConvertError(f"refine_steps: must be an integer >= 0, got {got!r}")
        if not isinstance(self.refine_rows, int) or self.refine_rows < 0:
            raise KVConvertError(f"refine_rows: must be an integer >= 0, got {self.refine_rows!r}")
        if self.refine_lr is not None and not self.refine_lr > 0:
            raise KVConvertError(f"refine_lr: must be > 0, got {self.refine_lr!r}")
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise KVConvertError(f"kv_budget: must be in (0, 1], got {self.kv_budget!r}")
        for key in ("kv_heads", "num_samples", "seq_len", "batch_size", "budget_samples"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
        if self.target in ("pod", "gqa,pod"):
            self._validate_pod()
        if self.seq_len < 2:
            raise KVConvertError("seq_len: must be at least 2")
        parse_size(self.max_shard_size)
        if self.base_model is not None and not HUB_ID.match(self.base_model):
            raise KVConvertError(
                f"base_model: {self.base_model!r} is not a Hub id (user/name or org/name)"
            )
        return self

    def _validate_pod(self) -> None:
        if self.target == "pod" and self.kv_heads is not None:
            raise KVConvertError(
                "kv_heads: --kv-heads belongs to --target gqa (or gqa,pod), not pod"
            )
        for key in ("sink", "recent", "keep_first"):
            v = getattr(self, key)
            if key == "recent" and v is None:  # chosen from the model's context (pod/target.py)
                continue
            if not isinstance(v, int) or v < 0:
                raise KVConvertError(f"{key}: must be an integer >= 0, got {v!r}")
        for key in ("context", "max_block"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
        # the similarity is measured on distant tokens: refuse before any model is loaded
        if self.recent is not None and self.seq_len <= self.sink + self.recent + 1:
            raise KVConvertError(
                f"seq_len: calibration sequences of {self.seq_len} tokens have no "
                f"distant tokens with sink {self.sink} + recent {self.recent}; use --seq-len "
                f"above {self.sink + self.recent + 1} or a smaller --recent"
            )
        if (
            self.heal_steps
            and self.recent is not None
            and self.heal_seq_len is not None
            and self.heal_seq_len <= self.sink + self.recent + 1
        ):
            raise KVConvertError(
                f"heal_seq_len: healing sequences of {self.heal_seq_len} tokens have no "
                f"distant tokens with sink {self.sink} + recent {self.recent}, so healing "
                f"would teach nothing; use --heal-seq-len above {self.sink + self.recent + 1}"
            )
        if not 0 <= self.threshold <= 1:
            raise KVConvertError(f"threshold: must lie in [0, 1], got {self.threshold}")
        if self.kv_saving is not None and not 0 < self.kv_saving < 0.5:
            raise KVConvertError(
                f"kv_saving: must lie in (0, 0.5) (values are never shared), got {self.kv_saving}"
            )
        grid = self.distant_biases()  # refuses unreadable text
        if grid and (self.pod_map or self.kv_saving is None or self.map_by == "similarity"):
            raise KVConvertError(
                "distant_bias: the bias is chosen with the borrowing-cost map; give --kv-saving "
                "F (with --map-by auto or cost) and no --pod-map"
            )
        if self.map_by == "cost" and self.kv_saving is None and not self.pod_map:
            raise KVConvertError(
                "map_by: cost chooses the map that reaches a --kv-saving target; give "
                "--kv-saving F, or use --map-by similarity with --threshold"
            )

    def distant_biases(self) -> tuple[float, ...]:
        """``--distant-bias`` as numbers (empty when not given)."""
        if self.distant_bias is None:
            return ()
        text = self.distant_bias
        parts = text if isinstance(text, list | tuple) else str(text).split(",")
        try:
            grid = tuple(float(x) for x in parts)
        except ValueError:
            raise KVConvertError(
                f"distant_bias: cannot read {text!r} (e.g. 0,-1,-2,-4: logit biases to choose from)"
            ) from None
        if not grid or any(not math.isfinite(b) for b in grid):
            raise KVConvertError(f"distant_bias: {text!r} must be finite numbers, e.g. 0,-1,-2")
        return tuple(sorted(set(grid), reverse=True))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def check_choices_and_threads(options: Any) -> None:
    """The checks every option dataclass (Recipe, HealOptions, EvalSettings) shares: each
    field with ``choices`` holds one of them, and ``threads`` is unset or positive."""
    for f in fields(options):
        allowed = f.metadata.get("choices")
        if allowed and getattr(options, f.name) not in allowed:
            raise KVConvertError(
                f"{f.name}: {getattr(options, f.name)!r} is not one of {', '.join(allowed)}"
            )
    threads = getattr(options, "threads", None)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise KVConvertError(f"threads: must be a positive integer, got {threads!r}")


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            num = s[: -len(unit)]
            break
    else:
        unit, num = "", s.rstrip("B")
    try:
        value = float(num) * SIZE_UNITS.get(unit, 1)
    except ValueError:
        raise KVConvertError(f"max_shard_size: cannot read {text!r} (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise KVConvertError(f"max_shard_size: must be positive, got {text!r}")
    return int(value)


# --- recipe files (YAML) --------------------------------------------------------------------
#: Fields that say where to write and what this machine may do, not what to compute: never
#: written to a recipe file and refused when read from one (a downloaded recipe must not turn
#: on remote code or overwrite a folder). Fields opt out too with option(..., in_recipe=False).
LOCAL_ONLY = ("output", "overwrite", "trust_remote_code")
#: How a run is executed, not what it produces (docs/recipes.md): never written to a recipe
#: file, so that a recorded recipe reruns anywhere (a resumed run's recipe must not say
#: resume). Recipe files written before this rule still load: these keys are ignored there,
#: with a note.
RUN_SETTINGS = (
    "device",
    "threads",
    "resume",
    "dry_run",
    "heal_resume",
    "offload_activations",
)


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
