"""Follow one conversion's ``recipe`` through the package, and list import circles (by hand).

    python benchmarks/recipe_walk.py [--model ../shared/models/stories260K] [--steps 400]
        [-- extra convert options, e.g. --target pod]

What is counted (docs/architecture.md explains the floors):

- **files in circles**: modules of ``kvconvert`` that import each other in a cycle (strongly
  connected components of the static import graph, function-level imports included).
- **the walk**: every call into a ``kvconvert`` function that receives the run's ``Recipe``
  object as an argument is one step, up to ``--steps``. Reported: distinct files entered;
  *returns*: steps into a file that the walk had been in before but left since; *climbs*:
  steps whose callee imports the caller's module (directly or through others), i.e. a call
  up the import graph (inside an import circle every call between its members is one); and
  the most-entered file with how many times the walk entered it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.imports import PKG, circles, import_graph, importers, module_name  # noqa: E402


def walk(argv: list[str], steps: int) -> list[tuple[str, str | None]]:
    """(callee module, caller module) of the first ``steps`` calls that receive the recipe."""
    import kvconvert
    from kvconvert.cli import main
    from kvconvert.recipe import Recipe

    root = str(PKG)
    seen: list[tuple[str, str | None]] = []

    def mod_of(filename: str) -> str | None:
        if not filename.startswith(root):
            return None
        return module_name(Path(filename))

    def tracer(frame, event, arg):  # noqa: ANN001 - sys.settrace's signature
        if event != "call" or len(seen) >= steps:
            return None
        callee = mod_of(frame.f_code.co_filename)
        if callee is None:
            return None
        code = frame.f_code
        args = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if any(isinstance(frame.f_locals.get(a), Recipe) for a in args):
            back = frame.f_back
            caller = None
            while back is not None and caller is None:
                caller = mod_of(back.f_code.co_filename)
                back = back.f_back
            seen.append((callee, caller))
        return None

    del kvconvert
    sys.settrace(tracer)
    try:
        main(argv, standalone_mode=False)
    finally:
        sys.settrace(None)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("extra", nargs="*", help="more convert options (after --)")
    args = ap.parse_args()

    graph = import_graph()
    rings = circles(graph)
    print(f"files in circles: {sum(map(len, rings))}")
    for ring in rings:
        print("  circle:", " ".join(ring))
    up = importers(graph)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [args.model, "-o", f"{tmp}/out", "--num-samples", "8", "--seq-len", "64"]
        seen = walk(argv + (args.extra or ["--kv-heads", "2"]), args.steps)
    files = [callee for callee, _ in seen]
    left: set[str] = set()
    returns = 0
    for prev, cur in zip(files, files[1:], strict=False):
        if cur != prev:
            left.add(prev)
            returns += cur in left
    climbs = sum(
        1 for callee, caller in seen if caller and callee != caller and callee in up[caller]
    )
    top, _ = Counter(files).most_common(1)[0]
    starts = zip([None, *files], files, strict=False)
    entered = sum(1 for prev, cur in starts if cur != prev and cur == top)
    print(
        f"walk: {len(seen)} steps, {len(set(files))} files entered, {returns} returns to a "
        f"file left before, {climbs} calls up the import graph; most entered: {top} "
        f"({entered} times)"
    )


if __name__ == "__main__":
    main()
