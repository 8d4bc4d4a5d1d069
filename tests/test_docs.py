"""Generated docs are current; the README speaks to users."""

from __future__ import annotations

from kvconvert.clidoc import render
from tests.conftest import ROOT


def test_cli_reference_is_current():
    assert (ROOT / "docs/cli.md").read_text() == render(), (
        "docs/cli.md is stale: run python -m kvconvert.clidoc > docs/cli.md"
    )


def test_readme_speaks_to_users():
    """The README's commands use what any user can fetch (the demo, PyPI, the Hub), never
    this repository's developer-only fixtures beside the checkout."""
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme and "stories260K" not in readme.split("## Development")[0]
    assert "kvconvert demo" in readme and "benchmarks/smollm2_fixture.py" in readme
