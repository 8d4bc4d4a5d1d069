"""One line that says how long a long step will take, printed once, early.

Progress bars show a rate, but only once their first unit is done, and a log keeps only their
last state. Sampling, the per-layer sensitivity of ``--kv-budget`` and healing can run for
many minutes on a CPU, so each says after its first few units what the whole will cost, in
one line on stderr: measured on this machine, under its present load (docs/scale.md gives the
costs per billion parameters).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm.auto import tqdm

#: Steps projected to take less than this are not announced.
MIN_SECONDS = 20.0


def duration(seconds: float) -> str:
    """``95`` -> ``1 min 35 s``; ``7300`` -> ``2 h 1 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Estimate:
    """Counts units of work; after ``after`` units (and at least ``min_time`` seconds, so the
    rate is measured, not guessed) prints ``what: about T in all (n of N unit took t)``, once,
    when T is at least ``MIN_SECONDS``."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "steps",
        after: int = 3,
        min_time: float = 1.0,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.after, self.min_time, self.clock = after, min_time, clock
        self.stream = stream
        self.done, self.start = 0, clock()
        self.pending = enabled and total > 0

    def update(self, n: int = 1) -> None:
        if not self.pending:
            return
        self.done += n
        elapsed = self.clock() - self.start
        if self.done < min(self.after, self.total) or elapsed < self.min_time:
            return
        self.pending = False
        projected = elapsed * self.total / self.done
        if projected >= MIN_SECONDS:
            print(
                f"{self.what}: about {duration(projected)} in all ({self.done} of {self.total} "
                f"{self.unit} took {elapsed:.1f} s)",
                file=self.stream or AboveBars(),  # never glued to a live bar
                flush=True,
            )


class AboveBars:
    """A text stream for an estimate's line: written above the live bars (``tqdm.write``), so
    the line is not glued to the end of a bar."""

    def __init__(self) -> None:
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            tqdm.write(line, file=sys.stderr)
        return len(text)

    def flush(self) -> None:
        pass
