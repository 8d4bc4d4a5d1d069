"""``kvconvert check OUTPUT --engine vllm``: comparisons, refusals and argument handling.

Without vLLM, a stand-in engine (``tests/engine_standin.py``) speaks the probe's protocol; one
test runs the real vLLM when ``KVCONVERT_VLLM_PYTHON`` names an interpreter that has it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvconvert
from kvconvert.enginecheck import check_engine, expected_kv_tokens
from tests.conftest import FAST
from tests.engine_standin import interpreter
from tests.test_check import one_line, run

POD = {"sink": 2, "recent": 8, **FAST}
VLLM_PYTHON = os.environ.get("KVCONVERT_VLLM_PYTHON")
LLAMA_CPP = os.environ.get("KVCONVERT_LLAMA_CPP")


@pytest.fixture(scope="module")
def outputs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    llama, mistral = str(tiny_models["llama"]), str(tiny_models["mistral"])
    return {
        "gqa": kvconvert.convert(llama, str(root / "gqa"), kv_heads=2, **FAST),
        "perlayer": kvconvert.convert(
            llama, str(root / "perlayer"), kv_heads_per_layer=[2, 1], format="kvconvert", **FAST
        ),
        "project": kvconvert.convert(
            llama, str(root / "project"), kv_heads=1, rope_keys="project", **FAST
        ),
        "pod": kvconvert.convert(mistral, str(root / "pod"), target="pod", kv_saving=0.1, **POD),
    }


def test_a_faithful_engine_passes_with_its_capacity(outputs, tmp_path):
    standin = interpreter(tmp_path, "faithful")
    res = run(str(outputs["gqa"]), "--engine", "vllm", "--python", standin)
    line = one_line(res)
    assert res.exit_code == 0, res.output
    assert line.startswith(f"ok: {outputs['gqa']} (vLLM standin as LlamaForCausalLM, float32)")
    assert "greedy 64/64 tokens as transformers" in line
    # the stand-in sizes its cache from the config's head counts, the check from kvconvert.json
    report = json.loads((outputs["gqa"] / "kvconvert.json").read_text())
    tokens = 2 * 2**30 // report["kv_bytes_per_token"]["after"]
    predicted = f"as kvconvert.json predicts ({tokens:,})"
    assert line.endswith(f"KV cache {tokens:,} tokens in 2 GiB, {predicted}")


def test_llama_cpp_is_compared_by_cache_bytes(outputs, tmp_path):
    standin = interpreter(tmp_path, "faithful")
    tree = tmp_path / "llama.cpp"
    tree.mkdir()
    res = run(str(outputs["gqa"]), "--engine", "llama.cpp", "--llama-cpp", str(tree),
              "--python", standin)  # fmt: skip
    line = one_line(res)
    assert res.exit_code == 0, res.output
    assert line.startswith(f"ok: {outputs['gqa']} (llama.cpp standin as LlamaForCausalLM")
    report = json.loads((outputs["gqa"] / "kvconvert.json").read_text())
    f16 = report["kv_bytes_per_token"]["after"] // 2 * 256  # float32 report, 256 cells
    assert line.endswith(f"KV cache {f16:,} bytes at 256 cells (f16), as kvconvert.json "
                         f"predicts ({f16:,})")  # fmt: skip


def test_an_engine_computing_another_model_fails(outputs, tmp_path):
    res = check_engine(outputs["gqa"], "vllm", python=interpreter(tmp_path, "drift"), new_tokens=4)
    assert not res.ok
    assert res.logprob_max_diff == pytest.approx(0.01, abs=1e-4)
    assert "prompt log-probs differ from transformers' by up to 0.01" in res.line()
    assert "the engine computes a different model" in res.line()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("pod", "kvconvert PoD checkpoint: an engine that runs its own attention kernels"),
        ("perlayer", "it has a different number of KV heads per layer ([2, 1])"),
        ("project", "it has keys projected after RoPE (key_down, query_down) inside attention"),
    ],
)
def test_outputs_an_engine_cannot_serve_are_refused_with_reason(outputs, tmp_path, kind, reason):
    standin = interpreter(tmp_path, "faithful")
    res = run(str(outputs[kind]), "--engine", "vllm", "--python", standin)
    line = one_line(res)
    assert res.exit_code == 1
    assert line.startswith(f"FAILED: {outputs[kind]} (vLLM standin): vLLM does not serve this ")
    assert "stops with the checkpoint's reason, as it should: kvconvert " in line
    assert reason in line
    assert line.endswith("the model card says which engines serve it.")


def test_a_dense_run_of_pod_is_caught_by_the_log_probs(outputs, tmp_path):
    """An engine that ignored the refusal and ran PoD's weights as the dense original model:
    the prompts reach past the recent window, so distant tokens differ."""
    res = check_engine(outputs["pod"], "vllm", python=interpreter(tmp_path, "dense"), new_tokens=4)
    assert not res.ok
    assert res.refused is None
    assert res.logprob_max_diff > 1e-3
    assert "the engine computes a different model" in res.line()


def test_an_engine_crash_is_one_line(outputs, tmp_path):
    res = run(str(outputs["gqa"]), "--engine", "vllm", "--python", interpreter(tmp_path, "crash"))
    assert res.exit_code == 1
    assert one_line(res) == (
        f"FAILED: {outputs['gqa']} (vLLM): the vLLM process stopped without a result (exit 139): "
        "Fatal Python error: Segmentation fault"
    )


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_real_probe_without_vllm_says_how_to_point_at_it(outputs):
    res = run(str(outputs["gqa"]), "--engine", "vllm")
    assert res.exit_code == 1
    assert one_line(res) == (
        f"FAILED: {outputs['gqa']} (vLLM): vLLM is not importable by {sys.executable} "
        "(ModuleNotFoundError: No module named 'vllm'); install it in its own environment and "
        "pass that interpreter as --python (docs/serving.md)"
    )


def test_argument_handling(outputs, tmp_path):
    gqa = str(outputs["gqa"])
    res = run(gqa, "--python", sys.executable)
    assert res.exit_code == 2 and "--python names the interpreter of --engine vllm" in res.output
    res = run(gqa, "--engine", "vllm", "--kv-space", "0")
    assert res.exit_code == 2 and "--kv-space" in res.output
    res = run(gqa, "--engine", "sglang")
    assert res.exit_code == 2
    assert "'sglang' is not one of 'transformers', 'vllm', 'llama.cpp'" in res.output
    res = run(gqa, "--engine", "vllm", "--llama-cpp", str(tmp_path))
    assert res.exit_code == 2 and "--llama-cpp goes with --engine llama.cpp" in res.output
    res = run(gqa, "--engine", "llama.cpp")
    assert res.exit_code == 1 and "--llama-cpp: give a llama.cpp source tree" in res.output
    missing = str(tmp_path / "no-such-python")
    res = run(gqa, "--engine", "vllm", "--python", missing)
    assert res.exit_code == 1
    assert one_line(res).endswith(f"cannot run {missing}: No such file or directory")
    with pytest.raises(kvconvert.KVConvertError, match="kv_space_gib: must be a whole number"):
        check_engine(gqa, "vllm", kv_space_gib=1.5)
    with pytest.raises(kvconvert.KVConvertError, match="engine: 'llama' is not one of"):
        check_engine(gqa, "llama")


def test_expected_capacity_follows_the_served_dtype():
    report = {"kv_bytes_per_token": {"after": 1024, "dtype": "float32"}}
    assert expected_kv_tokens(report, "float32", 1) == (2**20, "kv_bytes_per_token")
    assert expected_kv_tokens(report, "bfloat16", 1) == (2**21, "kv_bytes_per_token")
    assert expected_kv_tokens(None, "float32", 1)[0] is None


@pytest.mark.slow
@pytest.mark.skipif(
    not VLLM_PYTHON, reason="set KVCONVERT_VLLM_PYTHON to a python with vLLM (docs/serving.md)"
)
def test_real_vllm_serves_gqa_and_refuses_pod(tmp_path):
    """vLLM's CPU attention needs head_dim 64 or more: small Llama and GPT-2 of that shape.
    GPT-2's GQA runs through vLLM's Transformers backend, on kvconvert's model code."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    gpt2 = GPT2Config(
        vocab_size=256,
        n_embd=128,
        n_layer=2,
        n_head=2,
        n_positions=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    src = str(tmp_path / "llama")
    served = [
        kvconvert.convert(src, str(tmp_path / "kv1"), kv_heads=1, **FAST),
        kvconvert.convert(str(tmp_path / "gpt2"), str(tmp_path / "gpt2kv1"), kv_heads=1, **FAST),
    ]
    pod = kvconvert.convert(src, str(tmp_path / "pod"), target="pod", kv_saving=0.1, **POD)
    cmd = [sys.executable, "-m", "kvconvert", "check", "--engine", "vllm", "--python"]
    for folder in served:
        ok = subprocess.run([*cmd, VLLM_PYTHON, str(folder)], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
        assert "as kvconvert.json predicts" in ok.stdout
    refused = subprocess.run([*cmd, VLLM_PYTHON, str(pod)], capture_output=True, text=True)
    assert refused.returncode == 1
    assert "as it should: kvconvert PoD checkpoint" in refused.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    not (
        LLAMA_CPP
        and importlib.util.find_spec("llama_cpp")
        and importlib.util.find_spec("sentencepiece")
    ),
    reason="set KVCONVERT_LLAMA_CPP to a llama.cpp source tree, with llama-cpp-python and "
    "sentencepiece installed (docs/serving.md)",
)
def test_real_llama_cpp_runs_gqa_and_refuses_pod(tmp_path):
    """llama.cpp's converter needs a vocabulary: a SentencePiece one trained on a few words."""
    import random

    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the park with our friends after school"
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(rng.choices(words.split(), k=12)) for _ in range(500)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=64, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    src = tmp_path / "src"
    LlamaForCausalLM(config).save_pretrained(src)
    (src / "tokenizer.model").write_bytes((tmp_path / "tok.model").read_bytes())
    kv2 = kvconvert.convert(str(src), str(tmp_path / "kv2"), kv_heads=2, **FAST)
    pod = kvconvert.convert(str(src), str(tmp_path / "pod"), target="pod", kv_saving=0.1, **POD)
    res = check_engine(kv2, "llama.cpp", llama_cpp=LLAMA_CPP)
    assert res.ok, res.line()
    assert res.architecture == "llama"
    assert abs(res.kv_bytes - res.expected_kv_bytes) <= 1e-3 * res.expected_kv_bytes
    assert res.logprob_max_diff < 1e-3
    res = check_engine(pod, "llama.cpp", llama_cpp=LLAMA_CPP)
    assert "Model KVConvertPodForCausalLM is not supported" in res.line()
    assert "llama.cpp has no converter for kvconvert's own model code" in res.line()


def test_each_card_says_which_engines_serve_it(outputs):
    """The card's Serving paragraph matches what the engines do with the output."""
    cards = {k: (folder / "README.md").read_text() for k, folder in outputs.items()}
    assert "**Serving.** vLLM, SGLang and llama.cpp serve it as the source" in cards["gqa"]
    for kind in ("perlayer", "project"):
        assert "**Serving.** Only transformers runs it" in cards[kind]
        assert "vLLM stops at start-up with that reason" in cards[kind]
    assert "**Serving.** Only transformers runs PoD" in cards["pod"]
    for card in cards.values():
        assert "`kvconvert check FOLDER --engine vllm`" in card
