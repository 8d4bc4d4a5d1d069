"""Long steps say early how long they will take; --threads is honoured and checked."""

from __future__ import annotations

import io

import pytest
import torch

import kvconvert
import kvconvert.eta as eta_mod
from kvconvert.eta import Estimate, duration
from tests.conftest import FAST


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_estimate_is_printed_once_after_the_first_steps():
    clock, out = Clock(), io.StringIO()
    est = Estimate("healing", 100, "steps", stream=out, clock=clock)
    for _ in range(2):
        clock.t += 1.0
        est.update()
    assert out.getvalue() == ""  # two steps: not yet
    for _ in range(10):
        clock.t += 1.0
        est.update()
    assert out.getvalue() == "healing: about 1 min 40 s in all (3 of 100 steps took 3.0 s)\n"


def test_short_or_disabled_steps_stay_silent():
    clock, out = Clock(), io.StringIO()
    short = Estimate("sampling", 10, stream=out, clock=clock)  # 10 s projected: below 20 s
    off = Estimate("sampling", 1000, stream=out, clock=clock, enabled=False)
    for _ in range(5):
        clock.t += 1.0
        short.update()
        off.update()
    assert out.getvalue() == ""
    assert duration(7300) == "2 h 1 min" and duration(59.6) == "1 min 0 s"


def test_self_calibration_announces_its_cost(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eta_mod, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(Estimate, "__init__", _fast_init(Estimate.__init__))
    opts = {**FAST, "progress": True}
    kvconvert.convert(str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, **opts)
    err = capsys.readouterr().err
    assert "sampling calibration: about" in err and "decode steps took" in err


def _fast_init(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "min_time": 0.0})

    return wrapped


def test_threads_are_set_for_the_run_and_checked_first(tiny_models, tmp_path):
    before = torch.get_num_threads()
    try:
        kvconvert.convert(
            str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, threads=1, **FAST
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(kvconvert.KVConvertError, match="threads: must be a positive integer"):
        kvconvert.convert(
            str(tiny_models["llama"]), str(tmp_path / "bad"), kv_heads=2, threads=0, **FAST
        )
    assert not (tmp_path / "bad").exists()
