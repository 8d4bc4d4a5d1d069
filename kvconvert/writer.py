"""Output folder: sharded safetensors, index, config and side files, written atomically.

Everything goes into a hidden work folder next to the output; only a complete conversion is
renamed into place, so a failure or Ctrl-C never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import KVConvertError

#: Source files never copied: weights (rewritten), config/card/report (regenerated).
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".py")
SKIP_NAMES = {
    "config.json",
    "README.md",
    "kvconvert.json",
    "recipe.yaml",
    ".gitattributes",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}


class ShardedWriter:
    """Collects tensors into shards of at most ``max_shard_size`` bytes and writes them.

    One shard's tensors are held in memory at a time. Single-shard outputs are named
    ``model.safetensors``; larger ones ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as ``save_pretrained`` writes them.
    """

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder = folder
        self.max = max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            names.append(final)
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_json(self.folder / "model.safetensors.index.json", index)
        return names


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template, generation config and other small files unchanged."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in SKIP_NAMES and not p.name.endswith(SKIP_SUFFIXES):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise KVConvertError(f"output {output} already exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise KVConvertError(f"output {output} exists and is not a folder")


@contextmanager
def atomic_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a work folder; on success it replaces ``output``, on any failure it is removed."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.kvconvert-partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if output.exists():
        old = output.parent / f".{output.name}.kvconvert-old-{os.getpid()}"
        output.rename(old)
        work.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(output)
