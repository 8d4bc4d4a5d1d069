"""Tiny seeded models of each supported family, built from stock transformers configs.

Nothing is downloaded: each model is created with a fixed seed and saved with
``save_pretrained`` into a session-scoped temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("KVCONVERT_STORIES260K", ROOT.parent / "shared/models/stories260K"))


def _build(kind: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )
    torch.manual_seed({"llama": 0, "mistral": 1, "qwen2": 2}[kind])
    if kind == "llama":  # multi-head attention: 4 query heads, 4 KV heads, tied embeddings
        model = LlamaForCausalLM(
            LlamaConfig(
                num_attention_heads=4,
                num_key_value_heads=4,
                head_dim=16,
                tie_word_embeddings=True,
                **common,
            )
        )
    elif kind == "mistral":  # already grouped: 8 query heads over 4 KV heads
        model = MistralForCausalLM(
            MistralConfig(
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=8,
                tie_word_embeddings=False,
                **common,
            )
        )
    else:  # qwen2: q/k/v biases, made non-zero so that dropping them would show
        model = Qwen2ForCausalLM(
            Qwen2Config(
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, **common
            )
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    model.to(dtype).save_pretrained(folder)
    return folder


FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: _build(k, root / k) for k in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("mistral", tmp_path_factory.mktemp("bf16") / "mistral-bf16", torch.bfloat16)


@pytest.fixture(scope="session")
def stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES} (set KVCONVERT_STORIES260K to its folder)")
    return STORIES


def load(folder: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


@torch.inference_mode()
def logits(folder_or_model, ids: torch.Tensor) -> torch.Tensor:
    model = load(folder_or_model) if isinstance(folder_or_model, Path) else folder_or_model
    return model(input_ids=ids).logits


def token_ids(n: int = 2, length: int = 40, seed: int = 0, vocab: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


FAST = {"num_samples": 4, "seq_len": 32, "batch_size": 4, "progress": False}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's .safetensors files, by name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC ARGS`` on this checkout (gloo on CPU,
    one thread per rank); asserts it succeeded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    res = subprocess.run(
        [*cmd, "--standalone", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res
