"""The Recipe: every conversion option in one validated object.

The CLI parses flags into a Recipe, the Python API takes the same fields as keyword
arguments, and the effective recipe is recorded in the output's ``kvconvert.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import KVConvertError
from .gqa.grouping import GROUPINGS
from .gqa.solve import METHODS

TARGETS = ("gqa",)
ROPE_KEYS = ("complex", "real")
OBJECTIVES = ("output", "plain")
PIPELINES = ("auto", "sequential", "whole")
PROPAGATE = ("original", "converted")
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


@dataclass
class Recipe:
    """All options of a conversion; each field's metadata is its CLI flag's help."""

    model: str = option(None, "Source model: a local folder or a Hub id.", cli="argument")
    output: str = option(None, "Output folder (refused if it exists).", short="-o", required=True)
    target: str = option("gqa", "Conversion: gqa merges KV heads.", TARGETS)
    kv_heads: int | None = option(
        None, "KV heads per layer after merging; must divide the current count.", type=int
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
        "real: real PCA that ignores RoPE (baseline, not exact).",
        ROPE_KEYS,
    )
    objective: str = option(
        "output",
        "output: weigh values by o_proj and keys by the queries that read them; plain: unweighted.",
        OBJECTIVES,
    )
    grouping: str = option(
        "adjacent", "adjacent heads, or search the grouping that loses least per layer.", GROUPINGS
    )
    calibration: str = option(
        "self",
        "'self' (sample from the model from BOS), a .txt file or folder, a .jsonl "
        "(text or input_ids), or a Hub dataset id.",
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
    max_shard_size: str = option("5GB", "Largest output shard, e.g. 5GB or 500MB.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    trust_remote_code: bool = option(
        False, "Allow the source model's own code to run (off by default)."
    )
    overwrite: bool = option(False, "Replace an existing output folder.")
    # --- issue 7: layer-sequential engine, resume, dry run --------------------------------
    pipeline: str = option(
        "auto",
        "sequential: one decoder layer in memory at a time (weights streamed from the shards); "
        "whole: load the whole model for calibration; auto: sequential.",
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
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                key = f.name
                raise KVConvertError(
                    f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}"
                )
        if self.target == "gqa" and self.kv_heads is None:
            raise KVConvertError("kv_heads: --target gqa needs --kv-heads N")
        for key in ("kv_heads", "num_samples", "seq_len", "batch_size"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise KVConvertError("seq_len: must be at least 2")
        parse_size(self.max_shard_size)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


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
