"""The cache bytes a conversion report (``kvconvert.json``) promises, for any token count.

``kvconvert check`` and ``kvconvert eval`` hold the bytes of every tensor reachable from a real
cache object against this promise (docs/check.md): a cache that keeps masks, copies or more
keys than its formula says is flagged. Each target states its own formula
(``gqa/promise.py``, ``pod/promise.py``); this file picks the one the report's kind names.
"""

from __future__ import annotations

from typing import Any

import torch

from .gqa import promise as gqa_promise
from .pod import promise as pod_promise

#: how far measured cache bytes may stray from the report's promise
BYTES_TOLERANCE = 0.01
#: report "target" "kind" -> the module that states its promise (the composed gqa,pod
#: output's kind is pod: its cache is PoD's over the merged heads)
PROMISES = {"pod": pod_promise, "gqa": gqa_promise}


def expected_bytes(
    report: dict[str, Any], config: Any, tokens: int, dtype: torch.dtype
) -> tuple[int | None, str]:
    """Cache bytes the report promises after ``tokens`` tokens in ``dtype``, and where that
    number comes from (or None and why it cannot be derived)."""
    size = torch.empty((), dtype=dtype).element_size()
    kind = (report.get("target") or {}).get("kind")
    promise = PROMISES.get(kind) or next(
        (m for m in PROMISES.values() if m.REPORT_KEY in report), gqa_promise
    )
    return promise.promised_bytes(report, config, tokens, size)
