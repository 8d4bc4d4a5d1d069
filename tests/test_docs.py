"""Docs that are generated must be current."""

from __future__ import annotations

from kvconvert.clidoc import render
from tests.conftest import ROOT


def test_cli_reference_is_current():
    assert (ROOT / "docs/cli.md").read_text() == render(), (
        "docs/cli.md is stale: run python -m kvconvert.clidoc > docs/cli.md"
    )
