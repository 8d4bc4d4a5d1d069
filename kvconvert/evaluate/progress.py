"""Progress of an eval: one bar and one estimate per phase, all on stderr (a ``--json`` on
stdout stays clean), all off with ``progress=False``."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from ..eta import AboveBars, Estimate


class Phase:
    """One phase of an eval: a bar on stderr, and once its first ``after`` units are done, one
    line saying what the whole phase will take (``kvconvert.eta``, when 20 s or more: a log
    keeps it where it keeps only a bar's last state). Both are off with ``progress=False``."""

    def __init__(self, desc: str, total: int, unit: str, progress: bool, after: int = 1):
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress)
        self.eta = Estimate(desc, total, unit, after=after, enabled=progress, stream=AboveBars())

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.eta.update(n)

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def say(progress: bool, line: str) -> None:
    """One line on stderr that leaves the bars intact (off with ``progress=False``)."""
    if progress:
        tqdm.write(line, file=sys.stderr)
