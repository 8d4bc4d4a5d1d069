"""The offline quick-start: ``kvconvert demo`` converts a seeded model and reports numbers."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from kvconvert.cli import main
from tests.conftest import ROOT, load


def documented_output() -> str:
    """The demo's output as docs/getting-started.md shows it."""
    text = (ROOT / "docs" / "getting-started.md").read_text()
    return re.search(r"```\n(KV cache per token:.*?)```", text, re.S).group(1)


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+|\d+", text)]


def test_demo_runs_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["demo", "-o", "demo/", "--quiet"])
    assert r.exit_code == 0, r.output
    doc = documented_output()  # the docs show what a run prints (to 1e-3: thread counts)
    assert re.sub(r"[\d.]+", "#", r.output) == re.sub(r"[\d.]+", "#", doc), (r.output, doc)
    assert numbers(r.output) == pytest.approx(numbers(doc), abs=1e-3)
    before, after = map(int, re.search(r"(\d+) -> (\d+) bytes", r.output).groups())
    assert after * 2 == before
    kl_svd, kl_mean = map(
        float, re.search(r"svd ([\d.]+), mean-pooling baseline ([\d.]+)", r.output).groups()
    )
    assert 0 < kl_svd < kl_mean
    assert load(tmp_path / "demo" / "converted").config.num_key_value_heads == 4
