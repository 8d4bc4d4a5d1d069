"""What a newcomer trips on: local paths reaching the Hub, recipes that do not rerun, a healed
card that misstates what its recipe makes, file modes, a slow ``--help``, and error text
that names the wrong thing (docs/publishing.md, docs/recipes.md)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

import kvconvert
from kvconvert.card import record_fidelity
from kvconvert.cli import main
from kvconvert.errors import KVConvertError
from kvconvert.heal import HealOptions, heal
from kvconvert.recipe import load_recipe_file
from kvconvert.report import publishable
from tests.conftest import FAST, ROOT, interrupt_after_first_layer, tensors


def private_copy(tiny_models, tmp_path, kind: str = "llama"):
    """The tiny model in a folder whose path must never be published."""
    src = tmp_path / "home" / "me" / "secret-models" / "tiny-src"
    shutil.copytree(tiny_models[kind], src)
    return src


def test_eval_record_and_push_publish_no_local_path(tiny_models, tmp_path):
    """``eval --record`` writes its command into the card without paths, and what ``push``
    uploads (card, recipe, report) names no local folder; the local files keep theirs."""
    src = private_copy(tiny_models, tmp_path)
    data = tmp_path / "home" / "me" / "data" / "held-out.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"input_ids": [1 + i % 90] * 40}) + "\n" for i in range(4)))
    out = kvconvert.convert(str(src), str(tmp_path / "home" / "me" / "outs" / "kv2"), kv_heads=2,
                            calibration=str(data), **FAST)  # fmt: skip
    command = f"kvconvert eval {src} {out} --data {data} --record"
    record_fidelity(out, {"measured_by": "kvconvert eval", "kl": 0.1, "command": command})
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card, card
    assert "kvconvert eval tiny-src kv2 --data held-out.jsonl --record" in card

    up = publishable(out)
    assert set(up) == {"recipe.yaml", "kvconvert.json"}  # the card was already clean
    for name, data_bytes in up.items():
        assert str(tmp_path) not in data_bytes.decode(), name
    recipe = yaml.safe_load(up["recipe.yaml"])
    assert (
        recipe["model"] is None and "give the source model as MODEL" in up["recipe.yaml"].decode()
    )
    assert recipe["calibration"] == "held-out.jsonl"
    assert str(src) in (out / "recipe.yaml").read_text()  # the local copy still reruns here

    named = kvconvert.convert(str(src), str(tmp_path / "named"), kv_heads=2,
                              base_model="someorg/tiny", **FAST)  # fmt: skip
    recipe = yaml.safe_load(publishable(named)["recipe.yaml"])
    assert recipe["model"] == "someorg/tiny"  # the Hub id the card names


def test_recipe_holds_no_run_settings_and_a_resumed_output_reruns(
    tiny_models, tmp_path, capsys, monkeypatch
):
    src, out = str(tiny_models["llama"]), tmp_path / "o"
    resume_normally = interrupt_after_first_layer(monkeypatch)
    r = CliRunner().invoke(main, [src, "-o", str(out), "--kv-heads", "2", "--num-samples", "4",
                                  "--seq-len", "32", "--threads", "1", "--device", "cpu",
                                  "-q"])  # fmt: skip
    resume_normally()
    assert r.exit_code == 130 and "progress kept in" in r.output
    assert "no output was written" not in r.output  # it was kept: say so, and only that
    r = CliRunner().invoke(main, [src, "-o", str(out), "--kv-heads", "2", "--num-samples", "4",
                                  "--seq-len", "32", "--resume", "--device", "cpu", "--threads",
                                  "1", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    text = (out / "recipe.yaml").read_text()
    body = yaml.safe_load(text)
    for key in ("resume", "device", "threads", "dry_run", "heal_resume", "offload_activations"):
        assert key not in body, key
    assert "--resume" not in text and "--device" not in text  # nor in the header's command
    card = (out / "README.md").read_text()
    assert "--resume" not in card and "--device" not in card
    report = json.loads((out / "kvconvert.json").read_text())
    assert report["run"]["resume"] is True and "resume" not in report["recipe"]

    again = tmp_path / "again"
    r = CliRunner().invoke(main, ["--recipe", str(out / "recipe.yaml"), "-o", str(again), "-q"])
    assert r.exit_code == 0, r.output
    a, b = tensors(out), tensors(again)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    old = tmp_path / "old.yaml"  # written by kvconvert 0.1: run settings inside
    old.write_text(text + "resume: true\ndevice: cpu\nthreads: 2\n")
    capsys.readouterr()
    values = load_recipe_file(old)
    assert "resume" not in values and "device" not in values
    assert "ignoring resume, device, threads" in capsys.readouterr().err


def test_healed_card_shows_the_heal_and_files_get_usual_modes(tiny_models, tmp_path):
    src = private_copy(tiny_models, tmp_path)
    conv = kvconvert.convert(str(src), str(tmp_path / "conv"), kv_heads=2, method="mean", **FAST)
    healed = heal(HealOptions(original=str(src), converted=str(conv),
                              output=str(tmp_path / "healed"), steps=2, batch_size=4, seq_len=32,
                              num_samples=8, eval_samples=2, resume=False),
                  progress=False, command=f"kvconvert heal {src} {conv} -o {tmp_path}/healed "
                  "--steps 2 --device cpu")  # fmt: skip
    card = (healed / "README.md").read_text()
    reproduce = card[card.index("## Reproduce") :]
    assert "The command that converted (before healing)" in reproduce
    assert "Then healed with" in reproduce and "kvconvert heal tiny-src conv -o healed" in reproduce
    assert "reproduces the converted weights before healing" in reproduce
    assert "byte for byte" not in reproduce and "--device" not in reproduce
    assert str(tmp_path) not in card

    umask = os.umask(0)
    os.umask(umask)
    for path in healed.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o666 & ~umask, (path.name, oct(mode))  # safetensors wrote 0600


def test_cli_answers_help_and_bad_options_without_importing_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from kvconvert.cli import main\n"
        "for args in (['--help'], ['--version'], ['convert', '--help'], ['eval', '--help'],\n"
        "             ['heal', '--help'], ['m', '-o', 'x', '--kv-heads', 'two']):\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    assert r.exit_code in (0, 2), (args, r.output)\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _tokenizer(folder) -> None:
    """A word-level tokenizer for the tiny model's 96 ids, saved beside its weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(95)} | {"<unk>": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def test_pod_card_loads_the_tokenizer_without_a_question(tiny_models, tmp_path, monkeypatch):
    """The card's tokenizer line loads a PoD output's tokenizer with no interactive prompt."""
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    _tokenizer(src)
    out = kvconvert.convert(str(src), str(tmp_path / "pod"), target="pod", sink=2, recent=4,
                            **FAST)  # fmt: skip
    card = (out / "README.md").read_text()
    line = next(x for x in card.splitlines() if x.startswith("tokenizer = AutoTokenizer"))
    assert line == "tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)"
    assert "Merging KV heads" not in card

    def no_questions(*args, **kwargs):
        raise AssertionError(f"asked: {args}")

    monkeypatch.setattr("builtins.input", no_questions)
    tok = eval(line.split(" = ", 1)[1], {"AutoTokenizer": AutoTokenizer, "repo": str(out)})
    assert tok("w3 w7").input_ids == [3, 7]


def test_error_text_names_the_right_thing(tiny_models, tmp_path):
    src = str(tiny_models["llama"])
    r = CliRunner().invoke(main, [src, "-o", str(tmp_path / "o"), "--kv-heads", "0"])
    assert r.exit_code == 1 and "kv_heads: must be a positive integer, got 0" in r.output

    afile = tmp_path / "a-file"
    afile.write_text("x")
    r = CliRunner().invoke(main, [src, "-o", str(afile), "--kv-heads", "2"])
    assert r.exit_code == 1 and "is a file, not a folder" in r.output
    assert "--overwrite" not in r.output  # it would not help

    notes = tmp_path / "notes.md"
    notes.write_text("# some text\n")
    with pytest.raises(KVConvertError, match=r"\.md is not a format kvconvert reads \(\.txt"):
        kvconvert.convert(src, str(tmp_path / "md"), kv_heads=2, calibration=str(notes), **FAST)

    with pytest.raises(KVConvertError) as err:
        kvconvert.convert(src, str(tmp_path / "x"), kv_heads=3, **FAST)
    assert str(err.value).startswith("kv_heads=3 must divide") and "--" not in str(err.value)

    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kvconvert", "check", "nosuch"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=offline)
    assert r.returncode == 1 and "there is no folder 'nosuch' here" in r.stdout, r.stdout


def test_card_title_uses_the_model_name_when_known(tiny_models, tmp_path):
    src = tmp_path / "model"  # the folder name says nothing
    shutil.copytree(tiny_models["llama"], src)
    out = kvconvert.convert(str(src), str(tmp_path / "o"), kv_heads=2, base_model="org/Tiny-1B",
                            **FAST)  # fmt: skip
    assert "# Tiny-1B: 2 KV heads (from 4)" in (out / "README.md").read_text()
