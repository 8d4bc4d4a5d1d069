"""Recovery after conversion: distil the original model into the converted one.

``heal(HealOptions(...))`` is the whole run (see ``run.py``); ``kvconvert MODEL ...
--heal-steps N`` is composed by the conductor (``kvconvert.pipeline.convert_and_heal``) from a
conversion and this run, with ``heal_options_from``. The method is in docs/heal.md.
"""

from __future__ import annotations

from .options import HealOptions, heal_options_from
from .run import HealRun, heal, state_folder

__all__ = [
    "HealOptions",
    "HealRun",
    "heal",
    "heal_options_from",
    "state_folder",
]
