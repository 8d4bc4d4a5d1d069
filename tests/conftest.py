"""Shared fixtures: the tiny seeded models of ``tests/models.py`` (built once per session into
a temporary folder), stories260K when present, and small helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.models import FAMILIES, build_family

ROOT = Path(__file__).resolve().parents[1]
STORIES = Path(os.environ.get("KVCONVERT_STORIES260K", ROOT.parent / "shared/models/stories260K"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: build_family(k, root / k) for k in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family("mistral", tmp_path_factory.mktemp("bf16") / "mistral-bf16", torch.bfloat16)


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


def interrupt_after_first_layer(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Make the layer-sequential engine stop as Ctrl-C would, right after it saved layer 0's
    progress; returns a function that undoes it, so that the next run goes through."""
    from kvconvert.engines import sequential

    save = sequential.save_checkpoint

    def interrupted(state_dir, layer, *args):  # noqa: ANN001, ANN202
        save(state_dir, layer, *args)
        if layer == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(sequential, "save_checkpoint", interrupted)
    return lambda: monkeypatch.setattr(sequential, "save_checkpoint", save)
