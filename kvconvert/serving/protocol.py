"""The request/result protocol every probe script here speaks (docs/check.md).

A probe runs as ``python PROBE REQUEST.json RESULT.json`` in the engine's own interpreter,
which need not have kvconvert: the probes import this file as the top-level module
``protocol`` (a script's own folder is first on ``sys.path``). ``serve(run)`` reads the
request, lets ``run(request, result)`` fill the result dict, and always writes a result:
``{"missing": ...}`` when the engine does not import, ``result["error"]["messages"]`` (the
exception and its causes, one line each; engines wrap a model's own error in theirs) when
anything fails.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable


def messages(e: BaseException | None) -> list[str]:
    """The exception and its causes, outermost first, one line each."""
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = " ".join(str(e).split())
        out.append(f"{type(e).__name__}: {text}" if text else type(e).__name__)
        e = e.__cause__ or e.__context__
    return out


def serve(run: Callable[[dict, dict], None]) -> None:
    """Read ``sys.argv[1]``, run, write ``sys.argv[2]``; never exits without a result."""
    with open(sys.argv[1]) as f:
        req = json.load(f)
    res: dict = {"folder": req.get("folder")}
    try:
        run(req, res)
    except ImportError as e:  # the engine is not installed in this interpreter
        res = {"missing": messages(e)[0], "python": sys.executable}
    except Exception as e:  # noqa: BLE001 - a failure while running: reported, never lost
        res["error"] = {"messages": messages(e), "traceback": traceback.format_exc()[-4000:]}
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)
