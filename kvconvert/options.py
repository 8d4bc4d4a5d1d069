"""How options are declared: one dataclass field per option, carrying its CLI help and
allowed values, so that the CLI, docs/cli.md and the checks are all built from the declaration
(docs/architecture.md). The option classes (``Recipe`` and its groups, ``HealOptions``,
``EvalSettings``) and their checks build on this."""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any

from .errors import KVConvertError

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
