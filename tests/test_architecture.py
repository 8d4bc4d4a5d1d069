"""The package layout in docs/architecture.md is the code's: floors, no import circles."""

from __future__ import annotations

import re
from pathlib import Path

from tests.imports import PKG, circles, import_graph, module_files

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def documented_floors() -> dict[str, int]:
    """Path pattern under kvconvert/ (a file, or a folder ending in /) -> floor number."""
    floors: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|[^|]*\|(.*)\|\s*$", line)
        if m:
            for pattern in re.findall(r"`([^`]+)`", m.group(2)):
                assert pattern not in floors, f"{pattern} is listed twice in {DOC.name}"
                floors[pattern] = int(m.group(1))
    return floors


def floor_of(path: Path, floors: dict[str, int]) -> int | None:
    """The most specific pattern wins: the file itself, else its nearest listed folder."""
    rel = path.relative_to(PKG).as_posix()
    if rel in floors:
        return floors[rel]
    parts = rel.split("/")[:-1]
    while parts:
        folder = "/".join(parts) + "/"
        if folder in floors:
            return floors[folder]
        parts.pop()
    return None


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_every_file_has_a_floor_and_imports_only_down():
    floors = documented_floors()
    files = module_files()
    level = {name: floor_of(path, floors) for name, path in files.items()}
    missing = sorted(str(files[n].relative_to(PKG)) for n, f in level.items() if f is None)
    assert not missing, f"files missing from the floors table in {DOC.name}: {missing}"
    for pattern in floors:
        assert (PKG / pattern).exists(), f"{DOC.name} lists {pattern}, which does not exist"
    upward = [
        f"{mod} (floor {level[mod]}) imports {dep} (floor {level[dep]})"
        for mod, deps in import_graph().items()
        for dep in sorted(deps)
        if level[dep] > level[mod]
    ]
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_comments_point_inside_the_repository():
    """Docstrings and comments cite docs/ here, never the developers' shared notes."""
    outside = [
        f"{p.relative_to(PKG.parent)}:{i}"
        for p in PKG.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\.\./shared|shared/(notes|papers|models)", line)
    ]
    assert not outside, outside
