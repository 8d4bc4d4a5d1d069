"""Faults end in one clear line and lose nothing: a second run to the same output, a
read-only or full disk, ids the model cannot read, outputs that must not be deleted, saved
progress that must not be discarded silently, files that must not be published."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kvconvert
import kvconvert.calibration.data as data_mod
import kvconvert.writer as writer_mod
from kvconvert.cli import main
from kvconvert.engines import sequential
from kvconvert.errors import KVConvertError
from tests.conftest import FAST, interrupt_after_first_layer, tensors

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--kv-heads", "2", "--num-samples", "4", "--seq-len", "32", "--quiet"]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_second_run_to_the_same_output_is_refused_naming_the_holder(tiny_models, tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from kvconvert.writer import output_lock;"
            "lock = output_lock(Path(sys.argv[1])); lock.__enter__(); print('held', flush=True);"
            "time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run(str(tiny_models["llama"]), "-o", str(out), *ARGS)
        line = one_line(r.output)
        assert r.exit_code == 1 and "being written by another kvconvert run" in line
        assert f"pid {holder.pid} on" in line
        assert not out.exists() and not (tmp_path / "o.kvconvert-work").exists()
    finally:
        holder.kill()
        holder.wait()
    r = run(str(tiny_models["llama"]), "-o", str(out), *ARGS)  # the dead holder's lock is free
    assert r.exit_code == 0, r.output
    assert not writer_mod.lock_path(out.resolve()).exists()


def _failing_add(fail: int, err: int):
    """ShardedWriter.add that raises OSError(err) on tensors of layer ``fail``."""
    add = writer_mod.ShardedWriter.add

    def patched(self, name, tensor):  # noqa: ANN001, ANN202
        if f"layers.{fail}." in name:
            raise OSError(err, os.strerror(err), str(self._data_path()))
        return add(self, name, tensor)

    return patched


def test_read_only_output_is_one_line(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod.ShardedWriter, "add", _failing_add(0, errno.EROFS))
    r = run(str(tiny_models["llama"]), "-o", str(tmp_path / "o"), *ARGS)
    line = one_line(r.output)
    assert r.exit_code == 1 and "read-only file system" in line and "--resume" not in line


def test_full_disk_mid_conversion_says_resume_and_resume_finishes(
    tiny_models, tmp_path, monkeypatch
):
    src, out = str(tiny_models["llama"]), tmp_path / "o"
    ref = kvconvert.convert(src, str(tmp_path / "ref"), kv_heads=2, **FAST)
    add = writer_mod.ShardedWriter.add
    monkeypatch.setattr(writer_mod.ShardedWriter, "add", _failing_add(1, errno.ENOSPC))
    cli = [src, "-o", str(out), "--kv-heads", "2", "--num-samples", "4", "--seq-len", "32"]
    r = run(*cli, "--batch-size", "4", "--quiet")
    line = one_line(r.output)
    assert r.exit_code == 1 and "no space left on the device" in line
    assert "rerun with --resume" in line and "o.kvconvert-work" in line
    monkeypatch.setattr(writer_mod.ShardedWriter, "add", add)
    r = run(*cli, "--batch-size", "4", "--quiet")  # without --resume: the progress is kept
    assert r.exit_code == 1 and "holds an interrupted conversion (1 of 2 layers done)" in r.output
    r = run(*cli, "--batch-size", "4", "--quiet", "--resume")
    assert r.exit_code == 0, r.output
    a, b = tensors(ref), tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_with_overwrite_discards_saved_progress(tiny_models, tmp_path, monkeypatch):
    src, out = str(tiny_models["llama"]), tmp_path / "o"
    resume_normally = interrupt_after_first_layer(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        kvconvert.convert(src, str(out), kv_heads=2, **FAST)
    resume_normally()
    with pytest.raises(KVConvertError, match="add resume=True to continue it, or overwrite=True"):
        kvconvert.convert(src, str(out), kv_heads=2, **FAST)
    assert (tmp_path / "o.kvconvert-work").is_dir()
    kvconvert.convert(src, str(out), kv_heads=2, overwrite=True, **FAST)
    assert out.is_dir() and not (tmp_path / "o.kvconvert-work").exists()


def test_out_of_vocabulary_ids_refused_before_loading(tiny_models, tmp_path, monkeypatch):
    import transformers

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"input_ids": [1, 5, 5000, 7] * 20}) for _ in range(4)))

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the calibration ids were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    for engine in ("sequential", "whole"):
        o = tmp_path / engine
        r = run(str(tiny_models["llama"]), "-o", str(o), *ARGS, "--calibration", str(calib),
                "--pipeline", engine)  # fmt: skip
        line = one_line(r.output)
        assert r.exit_code == 1 and "token id 5000, outside the model's vocabulary" in line
        assert "(ids 0 to 95)" in line
        assert not o.exists() and not (tmp_path / f"{engine}.kvconvert-work").exists()


def test_output_holding_the_current_directory_is_refused(tiny_models, tmp_path, monkeypatch):
    out = kvconvert.convert(str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, **FAST)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.chdir(out)
    r = run(str(tiny_models["llama"]), "-o", ".", *ARGS, "--overwrite")
    assert r.exit_code == 1 and "is (or holds) the current directory" in one_line(r.output)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not list(tmp_path.glob(".*kvconvert*"))


def test_only_known_side_files_are_copied(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    (src / "notes.txt").write_text("do not publish")
    (src / "calibration.jsonl").write_text('{"text": "private"}\n')
    (src / "LICENSE").write_text("Apache-2.0")
    for target in ("gqa", "pod"):
        extra = {"kv_heads": 2} if target == "gqa" else {"recent": 4, "sink": 2}
        out = kvconvert.convert(str(src), str(tmp_path / target), target=target, **extra, **FAST)
        names = {p.name for p in out.iterdir()}
        assert {"generation_config.json", "LICENSE"} <= names, names
        assert not {"notes.txt", "calibration.jsonl"} & names, names
        copied = json.loads((out / "kvconvert.json").read_text())["files"]["copied"]
        assert copied == ["LICENSE", "generation_config.json"]


def test_heal_and_eval_refuse_a_model_of_another_original(tiny_models, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvconvert.evaluate import evaluate
    from kvconvert.heal import HealOptions

    torch.manual_seed(0)
    other = tmp_path / "other"
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(other)
    conv = kvconvert.convert(str(other), str(tmp_path / "conv"), kv_heads=2, **FAST)

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before the models were compared")

    monkeypatch.setattr(data_mod, "sample_from_model", sampled)
    with pytest.raises(KVConvertError, match="is not a conversion of .*hidden size is 32"):
        evaluate(str(tiny_models["llama"]), [str(conv)], progress=False)
    opts = HealOptions(original=str(tiny_models["llama"]), converted=str(conv),
                       output=str(tmp_path / "healed"), steps=2)  # fmt: skip
    with pytest.raises(KVConvertError, match="is not a conversion of .*the original's 64"):
        kvconvert.pipeline.heal(opts, progress=False)


def test_disk_is_checked_before_sampling(tiny_models, tmp_path, monkeypatch):
    def sampled(*args, **kwargs):
        raise AssertionError("calibration was sampled before the free disk space was checked")

    monkeypatch.setattr(data_mod, "sample_from_model", sampled)
    monkeypatch.setattr(
        sequential.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000)
    )
    with pytest.raises(KVConvertError, match="not enough disk space"):
        kvconvert.convert(str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, **FAST)


def test_recipe_reruns_from_another_directory_and_pod_has_one(tiny_models, tmp_path, monkeypatch):
    """recipe.yaml stores what reproduces the run (the source's absolute path, kept out of the
    card), for GQA and PoD outputs alike."""
    shutil.copytree(tiny_models["llama"], tmp_path / "work" / "src")
    monkeypatch.chdir(tmp_path / "work")
    runs = {"gqa": {"kv_heads": 2}, "pod": {"target": "pod", "sink": 2, "recent": 4}}
    for name, opts in runs.items():
        kvconvert.convert("src", f"out-{name}", **opts, **FAST)
    monkeypatch.chdir(tmp_path)
    for name in runs:
        first = tmp_path / "work" / f"out-{name}"
        assert "src" in (first / "README.md").read_text()
        assert str(tmp_path) not in (first / "README.md").read_text()
        again = kvconvert.convert(None, f"again-{name}", recipe=first / "recipe.yaml")
        a, b = tensors(first), tensors(again)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        config = json.loads((again / "config.json").read_text())
        assert config == json.loads((first / "config.json").read_text())
