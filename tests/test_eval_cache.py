"""The eval cache: the original's sampled tokens and retrieval scores are reused by the next
eval, give the same numbers, are missed when a setting or the original changes, and a
corrupt or mismatched entry is ignored and rewritten, never trusted."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import kvconvert
import kvconvert.calibration.data as data_mod
import kvconvert.evaluate.run as evaluate_mod  # where evaluate() looks its probes up
from kvconvert.cli import main
from kvconvert.evalcache import CACHE_FORMAT, EvalCache, cache_dir
from kvconvert.evaluate import EvalSettings, evaluate
from tests.conftest import FAST

SMALL = dict(num_samples=2, seq_len=16, context=40, new_tokens=4, repeats=1, trials=1, depths="0,1")
#: what a cached original must reproduce exactly (speed is timed afresh every run)
TIMED = {"prefill_tok_s", "decode_tok_s"}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("KVCONVERT_CACHE", str(folder))
    return folder / "eval"


@pytest.fixture(scope="module")
def halved(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalcache") / "llama-kv2"
    return kvconvert.convert(str(tiny_models["llama"]), str(out), kv_heads=2, **FAST)


@pytest.fixture()
def calls(monkeypatch):
    """Counts what the cache saves: sampling, retrieval and repetition runs (per model)."""
    counts = {"sample": 0, "retrieval": 0, "repetition": 0}
    sample, retrieval = data_mod.sample_from_model, evaluate_mod.run_retrieval
    loops = evaluate_mod.continuations

    def counted_sample(*args, **kwargs):
        counts["sample"] += 1
        return sample(*args, **kwargs)

    def counted_retrieval(*args, **kwargs):
        counts["retrieval"] += 1
        return retrieval(*args, **kwargs)

    def counted_loops(*args, **kwargs):
        counts["repetition"] += 1
        return loops(*args, **kwargs)

    monkeypatch.setattr(data_mod, "sample_from_model", counted_sample)
    monkeypatch.setattr(evaluate_mod, "run_retrieval", counted_retrieval)
    monkeypatch.setattr(evaluate_mod, "continuations", counted_loops)
    return counts


def run(tiny_models, halved, **overrides):
    settings = EvalSettings(**{**SMALL, **overrides})
    return evaluate(str(tiny_models["llama"]), [str(halved)], settings, progress=False)


def untimed(doc):
    return [{k: v for k, v in m.items() if k not in TIMED} for m in doc["models"]]


def test_second_eval_reuses_the_cache_and_gives_the_same_numbers(tiny_models, halved, cache, calls):
    first = run(tiny_models, halved)
    assert calls == {"sample": 1, "retrieval": 2, "repetition": 2}  # original and converted
    kinds = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert kinds == ["repetition", "retrieval", "samples"]
    second = run(tiny_models, halved)
    # only the converted model's retrieval and continuations
    assert calls == {"sample": 1, "retrieval": 3, "repetition": 3}
    assert untimed(second) == untimed(first)
    assert second["settings"] == first["settings"]


def test_a_changed_setting_or_original_misses_the_cache(tiny_models, halved, cache, calls):
    run(tiny_models, halved)
    run(tiny_models, halved, seed=7)  # other tokens, so other copy prompts too
    assert calls == {"sample": 2, "retrieval": 4, "repetition": 4}
    run(tiny_models, halved, trials=2)  # same tokens, other retrieval prompts
    assert calls == {"sample": 2, "retrieval": 6, "repetition": 5}
    run(tiny_models, halved, seq_len=20)
    assert calls == {"sample": 3, "retrieval": 8, "repetition": 7}
    config = tiny_models["llama"] / "config.json"
    st = config.stat()
    try:  # the original's files changed (same size, newer mtime): nothing is reused
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        run(tiny_models, halved)
        assert calls == {"sample": 4, "retrieval": 10, "repetition": 9}
    finally:
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not json", "other key", "other format", "wrong shape", "token out of range"],
)
def test_a_corrupt_or_mismatched_entry_is_ignored_and_rewritten(
    tiny_models, halved, cache, calls, damage
):
    fresh = run(tiny_models, halved)
    (entry,) = cache.glob("samples-*.json")
    good = entry.read_text()
    doc = json.loads(good)
    if damage == "truncated":
        entry.write_text(good[: len(good) // 2])
    elif damage == "not json":
        entry.write_bytes(b"\x00\xff garbage")
    else:
        if damage == "other key":
            doc["key"]["seed"] += 1
        elif damage == "other format":
            doc["format"] = CACHE_FORMAT + 1
        elif damage == "wrong shape":
            doc["value"] = doc["value"][:1]
        else:
            doc["value"][0][3] = 10**6  # an id no embedding has: would crash the forward
        entry.write_text(json.dumps(doc))
    again = run(tiny_models, halved)
    assert calls["sample"] == 2  # sampled again, not trusted
    assert untimed(again) == untimed(fresh)
    assert json.loads(entry.read_text()) == json.loads(good)  # rewritten whole
    (retrieval,) = cache.glob("retrieval-*.json")
    retrieval.write_text(json.dumps({**json.loads(retrieval.read_text()), "value": [2.0, 0.5]}))
    assert untimed(run(tiny_models, halved)) == untimed(fresh)  # a score above 1: refused
    # resampled tokens are the same tokens, so run 2 reused the original's scores and
    # continuations; run 3 its continuations only
    assert calls == {"sample": 2, "retrieval": 5, "repetition": 4}


def test_no_cache_neither_reads_nor_writes(tiny_models, halved, cache, calls):
    run(tiny_models, halved, no_cache=True)
    assert not cache.exists()
    run(tiny_models, halved)
    run(tiny_models, halved, no_cache=True)
    assert calls == {"sample": 3, "retrieval": 6, "repetition": 6}
    r = CliRunner().invoke(main, ["eval", "--help"])
    assert "--no-cache " in r.output and "--no-no-cache" not in r.output


def test_cache_location_and_atomic_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("KVCONVERT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kvconvert" / "eval"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvconvert" / "eval"
    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "eval"
    store = EvalCache(cache_dir(), {"original": "x"})
    path = store.put("samples", {"seed": 1}, [[1, 2]])
    assert path is not None and store.get("samples", {"seed": 1}) == [[1, 2]]
    assert store.get("samples", {"seed": 2}) is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    blocked = tmp_path / "file"
    blocked.write_text("")  # a cache 'folder' that is a file: skipped, never an error
    assert EvalCache(blocked / "eval", {}).put("samples", {}, [1]) is None


def test_each_phase_has_a_bar_on_stderr_and_quiet_has_none(tiny_models, halved, cache, capfd):
    settings = EvalSettings(**SMALL)
    evaluate(str(tiny_models["llama"]), [str(halved)], settings, progress=True)
    err = capfd.readouterr().err
    for phase in (
        "sampling evaluation tokens",
        "retrieval: original",
        "KL, perplexity: llama-kv2",
        "speed: llama-kv2",
        "retrieval: llama-kv2",
    ):
        assert phase in err, phase
    evaluate(str(tiny_models["llama"]), [str(halved)], settings, progress=True)
    err = capfd.readouterr().err
    assert "sampled earlier (eval cache)" in err and "measured earlier (eval cache)" in err
    assert "sampling evaluation tokens" not in err and "retrieval: original" not in err
    evaluate(str(tiny_models["llama"]), [str(halved)], settings, progress=False)
    assert capfd.readouterr().err == ""
