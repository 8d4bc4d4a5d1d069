"""The names GQA's options choose from, without torch: the CLI lists them in ``--help`` and
checks them before anything heavy is imported (docs/architecture.md)."""

from __future__ import annotations

#: ``--method``: how one group of KV heads is merged (``solve.py``).
METHODS = ("mean", "svd-weights", "svd")
#: ``--grouping``: which heads are merged together (``grouping.py``).
GROUPINGS = ("adjacent", "search")
