"""The Recipe: every conversion option in one validated object.

The CLI parses flags into a Recipe, the Python API takes the same fields as keyword
arguments, and the effective recipe is recorded in the output's ``kvconvert.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import KVConvertError
from .gqa.grouping import GROUPINGS
from .gqa.solve import METHODS

TARGETS = ("gqa",)
ROPE_KEYS = ("complex", "real")
OBJECTIVES = ("output", "plain")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30}


@dataclass
class Recipe:
    """All options of a conversion. Field docs are the CLI help texts."""

    model: str
    output: str
    target: str = "gqa"
    kv_heads: int | None = None
    method: str = "svd"
    rope_keys: str = "complex"
    objective: str = "output"
    grouping: str = "adjacent"
    calibration: str = "self"
    num_samples: int = 32
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    text_field: str = "text"
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    revision: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False

    def validate(self) -> Recipe:
        """Check every field; raise KVConvertError naming the bad option."""
        choices = {
            "target": TARGETS,
            "method": METHODS,
            "rope_keys": ROPE_KEYS,
            "objective": OBJECTIVES,
            "grouping": GROUPINGS,
            "device": DEVICES,
            "dtype": DTYPES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
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
