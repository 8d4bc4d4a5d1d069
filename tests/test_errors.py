"""Bad input gives one clear line and a non-zero exit, and never leaves an output behind."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kvconvert.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [*args, "--quiet"])


def test_unknown_local_path(tmp_path):
    r = run(str(tmp_path / "missing"), "--kv-heads", "2", "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "does not exist" in r.output


def test_hub_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    r = run("someorg/not-cached-model", "--kv-heads", "2", "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "the Hugging Face Hub cannot be reached" in r.output


def test_unsupported_model_type(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(
        BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64)
    ).save_pretrained(tmp_path / "bloom")
    r = run(str(tmp_path / "bloom"), "--kv-heads", "1", "-o", str(tmp_path / "o"))
    assert r.exit_code == 1
    assert "'bloom' is not supported" in r.output
    listed = ("gemma2", "gpt2", "gpt_neox", "llama", "mistral", "opt", "phi3", "qwen2", "qwen3")
    assert all(t in r.output for t in listed)


def test_kv_heads_not_dividing(tiny_models, tmp_path):
    r = run(str(tiny_models["llama"]), "--kv-heads", "3", "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "--kv-heads 3 must divide the model's 4 KV heads" in r.output
    assert "1, 2, 4" in r.output and not (tmp_path / "o").exists()


def test_missing_kv_heads(tiny_models, tmp_path):
    r = run(str(tiny_models["llama"]), "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "needs --kv-heads" in r.output


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(tiny_models, tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    r = run(str(src), "--kv-heads", "2", "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "corrupt" in r.output and "model.safetensors" in r.output
    assert not (tmp_path / "o").exists()


def test_existing_output_refused_then_overwritten(tiny_models, tmp_path):
    """An existing output is refused; --overwrite replaces an earlier kvconvert output (all of
    it) but never a folder that is not one (issue: it deleted unrelated files)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        str(tiny_models["llama"]),
        "--kv-heads",
        "2",
        "-o",
        str(out),
        "--num-samples",
        "2",
        "--seq-len",
        "16",
    ]
    r = run(*args)
    assert r.exit_code == 1 and "already exists" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = run(*args, "--overwrite")
    assert r.exit_code == 1 and "is not a kvconvert output" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    r = run(*args, "--overwrite")  # an empty folder may be filled
    assert r.exit_code == 0, r.output
    (out / "extra.txt").write_text("part of the old output")
    r = run(*args[:2], "1", *args[3:], "--overwrite")  # an earlier output: replaced whole
    assert r.exit_code == 0, r.output
    assert not (out / "extra.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1


def test_failure_leaves_no_partial_output(tiny_models, tmp_path, monkeypatch):
    import kvconvert.gqa.target as gqa_target
    import kvconvert.pipeline as pipeline

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(gqa_target, "copy_side_files", boom)
    with pytest.raises(RuntimeError):
        pipeline.convert(
            pipeline.Recipe(
                model=str(tiny_models["llama"]),
                output=str(tmp_path / "o"),
                kv_heads=2,
                num_samples=2,
                seq_len=16,
            ),
            progress=False,
        )
    # no output; only the clearly named work folder that --resume continues from
    assert [p.name for p in tmp_path.iterdir()] == ["o.kvconvert-work"]


def test_bad_calibration_source(tiny_models, tmp_path):
    r = run(
        str(tiny_models["llama"]),
        "--kv-heads",
        "2",
        "-o",
        str(tmp_path / "o"),
        "--calibration",
        "./nowhere.jsonl",
    )
    assert r.exit_code == 1 and "calibration source './nowhere.jsonl' not found" in r.output


def test_text_calibration_without_tokenizer(tiny_models, tmp_path):
    (tmp_path / "c.txt").write_text("once upon a time " * 50)
    r = run(
        str(tiny_models["llama"]),
        "--kv-heads",
        "2",
        "-o",
        str(tmp_path / "o"),
        "--calibration",
        str(tmp_path / "c.txt"),
    )
    assert r.exit_code == 1 and "needs a tokenizer" in r.output


def test_default_command_and_explicit_convert_agree(tiny_models, tmp_path):
    common = ["--kv-heads", "2", "--num-samples", "2", "--seq-len", "16", "--quiet"]
    a = CliRunner().invoke(main, [str(tiny_models["llama"]), "-o", str(tmp_path / "a"), *common])
    b = CliRunner().invoke(
        main, ["convert", str(tiny_models["llama"]), "-o", str(tmp_path / "b"), *common]
    )
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "args",
    [
        ["--target", "pod", "--sink", "2", "--recent", "8"],
        ["--kv-heads", "2", "--rope-keys", "project"],
    ],
)
def test_whole_model_paths_refuse_torchrun(tiny_models, tmp_path, monkeypatch, args):
    """Only the layer-sequential engine is distributed: anything else under torchrun would
    write the same output from every rank, so it is refused before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(main, [str(tiny_models["llama"]), *args, "-o", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "torchrun:" in res.output and "runs in one process only" in res.output
    assert not (tmp_path / "o").exists()
