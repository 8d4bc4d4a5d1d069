"""Recovery after conversion: distil the original model into the converted one.

``heal(HealOptions(...))`` is the whole run (see ``run.py``); ``kvconvert MODEL ...
--heal-steps N`` is composed by the conductor (``kvconvert.pipeline.convert_and_heal``) from a
conversion and this run, with ``Recipe.heal_options``. The method is in docs/heal.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import HealOptions

if TYPE_CHECKING:
    from .run import HealRun, heal, state_folder


def __getattr__(name: str) -> Any:
    """``run.py`` (torch) is imported on first use, so that the CLI reads HealOptions for its
    flags without importing torch (``kvconvert --help`` answers at once)."""
    if name in ("HealRun", "heal", "state_folder"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HealOptions",
    "HealRun",
    "heal",
    "state_folder",
]
