"""The offline quick-start: ``kvconvert demo`` converts a seeded model and reports numbers."""

from __future__ import annotations

import re

from click.testing import CliRunner

from kvconvert.cli import main
from tests.conftest import load


def test_demo_runs_offline(tmp_path):
    r = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "demo"), "--quiet"])
    assert r.exit_code == 0, r.output
    before, after = map(int, re.search(r"(\d+) -> (\d+) bytes", r.output).groups())
    assert after * 2 == before
    kl_svd, kl_mean = map(
        float, re.search(r"svd ([\d.]+), mean-pooling baseline ([\d.]+)", r.output).groups()
    )
    assert 0 < kl_svd < kl_mean
    assert load(tmp_path / "demo/converted").config.num_key_value_heads == 4
