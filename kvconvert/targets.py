"""The registry of conversion targets: ``--target`` name -> the class that implements it.

A new target is a folder (``gqa/``, ``pod/``) whose ``target.py`` subclasses
``kvconvert.target.Target``, plus one line here. Compositions of targets (``gqa,pod``) are
the conductor's (``pipeline.py``).
"""

from __future__ import annotations

from .gqa.target import GQATarget
from .pod.target import PodTarget
from .target import Target

TARGETS: dict[str, type[Target]] = {"gqa": GQATarget, "pod": PodTarget}


def target_class(name: str) -> type[Target]:
    return TARGETS[name]
