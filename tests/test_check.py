"""``kvconvert check OUTPUT``: one ok:/FAILED: line and the exit status, on tiny outputs."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import kvconvert
from kvconvert.check import CheckResult, check
from kvconvert.cli import main
from kvconvert.promise import expected_bytes
from tests.conftest import FAST

POD = {"sink": 2, "recent": 8, **FAST}


def run(*args: str):
    return CliRunner().invoke(main, ["check", *args])


def one_line(res) -> str:
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture(scope="module")
def gqa(tiny_models, tmp_path_factory):
    """A stock GQA output: Llama, 4 -> 2 KV heads (stock class, no remote code)."""
    out = tmp_path_factory.mktemp("check") / "gqa"
    return kvconvert.convert(str(tiny_models["llama"]), str(out), kv_heads=2, **FAST)


@pytest.fixture(scope="module")
def pod(tiny_models, tmp_path_factory):
    """A PoD output (remote code): Mistral, sink 2, recent 8, 10% saving at 32 tokens."""
    out = tmp_path_factory.mktemp("check") / "pod"
    return kvconvert.convert(
        str(tiny_models["mistral"]), str(out), target="pod", kv_saving=0.1, **POD
    )


def test_stock_gqa_output_is_ok(gqa):
    res = run(str(gqa))
    line = one_line(res)
    assert res.exit_code == 0, res.output
    assert line.startswith(f"ok: {gqa} (LlamaForCausalLM, transformers ")
    assert "generate agrees with uncached forward on 32/32 tokens" in line
    per_token = json.loads((gqa / "kvconvert.json").read_text())["kv_bytes_per_token"]["after"]
    assert line.endswith(f"cache {per_token * 64} bytes at 64 tokens as reported")


def test_python_api_and_json(gqa):
    res = check(gqa, new_tokens=4)
    assert isinstance(res, CheckResult) and res.ok and res.problems == []
    assert res.agreement == 1.0 and res.agreeing_tokens == res.new_tokens == 4
    assert res.bytes == res.expected_bytes > 0 and res.prompt_tokens == 64
    assert res.model_class == "LlamaForCausalLM" and res.transformers_version
    cli = run(str(gqa), "--new-tokens", "4", "--json")
    assert cli.exit_code == 0, cli.output
    doc = json.loads(cli.stdout)
    assert doc["ok"] and doc["bytes"] == res.bytes and doc["line"] == res.line()


def test_pod_output_is_ok(pod):
    """The PoD prompt must reach past sink + recent, and the promise is the report's formula."""
    res = run(str(pod))
    line = one_line(res)
    assert res.exit_code == 0, res.output
    assert line.startswith(f"ok: {pod} (KVConvertPodForCausalLM, transformers ")
    assert "on 32/32 tokens" in line and line.endswith("bytes at 64 tokens as reported")


def test_pod_promise_is_the_reports_own_number(pod):
    """At the report's context, the expected bytes are the report's ``at_context.pod``."""
    rep = json.loads((pod / "kvconvert.json").read_text())
    at = rep["kv_bytes"]["at_context"]
    config = SimpleNamespace(model_type="kvconvert_pod")
    got, _ = expected_bytes(rep, config, at["tokens"], torch.float32)
    assert got == at["pod"] < at["dense"]


def test_plain_model_skips_the_byte_comparison(tiny_models):
    res = run(str(tiny_models["qwen2"]), "--new-tokens", "4")
    line = one_line(res)
    assert res.exit_code == 0, res.output
    assert line.startswith("ok: ") and "(Qwen2ForCausalLM, transformers " in line
    assert line.endswith("(not compared: no kvconvert.json conversion report in the folder)")


def test_wrong_promise_fails(gqa, tmp_path):
    bad = shutil.copytree(gqa, tmp_path / "bad")
    rep = json.loads((bad / "kvconvert.json").read_text())
    rep["kv_bytes_per_token"]["after"] //= 2
    (bad / "kvconvert.json").write_text(json.dumps(rep))
    res = run(str(bad), "--new-tokens", "4")
    line = one_line(res)
    assert res.exit_code == 1
    measured, promised = rep["kv_bytes_per_token"]["after"] * 2 * 64, rep["kv_bytes_per_token"]
    assert line.startswith(f"FAILED: {bad} (transformers ")
    assert f"cache holds {measured} bytes at 64 tokens" in line
    assert f"report promises {promised['after'] * 64} bytes" in line


def test_modeling_file_that_raises_on_import(pod, tmp_path):
    bad = shutil.copytree(pod, tmp_path / "raises")
    with (bad / "modeling_kvconvert_pod.py").open("a") as f:
        f.write('\nraise RuntimeError("modeling code broken on purpose")\n')
    res = run(str(bad))
    line = one_line(res)
    assert res.exit_code == 1
    assert line.startswith(f"FAILED: {bad} (transformers ")
    assert "cannot load: RuntimeError: modeling code broken on purpose" in line


def test_model_code_from_elsewhere_runs_only_when_trusted(pod, tmp_path):
    """A folder with its own model code but no kvconvert.json (not known to be ours) is not
    run unasked; --trust-remote-code runs it."""
    other = tmp_path / "other"
    shutil.copytree(pod, other)
    (other / "kvconvert.json").unlink()
    res = run(str(other), "--new-tokens", "4")
    assert res.exit_code == 1
    assert "pass --trust-remote-code to run it" in one_line(res)
    res = run(str(other), "--new-tokens", "4", "--trust-remote-code")
    assert res.exit_code == 0, res.output
    assert one_line(res).startswith("ok: ")


def test_missing_weights(gqa, tmp_path):
    bad = shutil.copytree(gqa, tmp_path / "noweights")
    (bad / "model.safetensors").unlink()
    res = run(str(bad))
    line = one_line(res)
    assert res.exit_code == 1
    assert line.startswith(f"FAILED: {bad} (transformers ") and "cannot load: " in line
    assert "model.safetensors" in line


def test_missing_folder(tmp_path):
    res = run(str(tmp_path / "nothing"))
    assert res.exit_code == 1
    assert one_line(res).endswith(f"model folder '{tmp_path / 'nothing'}' does not exist")


def test_sliding_layers_hold_their_window():
    """A layer with a sliding window of 8 holds 7 tokens after the prefill, as in
    transformers' sliding cache; full layers hold all 64."""
    rep = {
        "target": {"kind": "gqa", "num_key_value_heads": [2, 1]},
        "kv_bytes_per_token": {"after": 2 * 3 * 16 * 4, "dtype": "float32"},
    }
    cfg = SimpleNamespace(num_hidden_layers=2, sliding_window=8)
    cfg.get_text_config = lambda: cfg
    cfg.layer_types = ["sliding_attention", "full_attention"]
    got, _ = expected_bytes(rep, cfg, 64, torch.float32)
    assert got == 2 * 16 * 4 * (2 * 7 + 1 * 64)
    cfg.layer_types = None  # no layer_types: sliding_window set means every layer slides
    assert expected_bytes(rep, cfg, 64, torch.float32)[0] == 2 * 3 * 16 * 4 * 7
