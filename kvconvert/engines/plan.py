"""What a layer-sequential run will cost, before it starts: output size, free disk, and the
``--dry-run`` plan (docs/scale.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import KVConvertError
from ..loading import compute_dtype
from ..recipe import Recipe
from ..source import Source
from ..target import Target


def layer_names(src: Source, i: int) -> list[str]:
    prefix = src.adapter.layer_prefix.format(i=i)
    return [n for n in src.tensors.names() if n.startswith(prefix)]


def output_bytes(target: Target, src: Source, out_dtype: torch.dtype | None) -> int:
    """Bytes of the output's weights, from the source headers (nothing is read)."""
    total = 0
    for name in src.tensors.names():
        numel, itemsize, floating = src.tensors.info(name)
        nbytes = numel * (out_dtype.itemsize if out_dtype is not None and floating else itemsize)
        total += int(nbytes * target.output_fraction(name))
    return total


def _nbytes(src: Source, name: str) -> int:
    numel, itemsize, _ = src.tensors.info(name)
    return numel * itemsize


def check_disk(output: Path, need: int) -> None:
    """Refuse to start when the output's file system has less than ``need`` bytes free."""
    probe = output.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise KVConvertError(
            f"not enough disk space at {probe}: the conversion needs about {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free"
        )


def plan(
    target: Target, src: Source, recipe: Recipe, device: torch.device, out_dtype: torch.dtype | None
) -> str:
    """The --dry-run text: what would be done, and what it would cost."""
    compute = compute_dtype(device, src.dtype)
    ckpt = sum(_nbytes(src, n) for n in src.tensors.names())
    layer_elems = max(
        sum(src.tensors.info(n)[0] for n in layer_names(src, i)) for i in range(src.num_layers)
    )
    hidden = int(src.config.get("hidden_size", 0))
    tokens = recipe.num_samples * recipe.seq_len if target.needs_data() else 0
    acts = 2 * tokens * hidden * compute.itemsize
    attn = sum(
        src.tensors.info(n)[0] for n in src.attention_tensor_names(0)
    )  # one layer's attention, float64, before and after the solve
    est = layer_elems * compute.itemsize + acts + 2 * attn * 8
    out_size = output_bytes(target, src, out_dtype)
    probe = Path(recipe.output).expanduser().parent
    while not probe.exists():
        probe = probe.parent
    lines = [
        f"model        {recipe.model} ({src.config.get('model_type')}, {src.num_layers} layers, "
        f"{src.num_heads} query heads, head_dim {src.head_dim})",
        *target.dry_run_lines(out_dtype),
        f"calibration  {recipe.calibration}: {recipe.num_samples} x {recipe.seq_len} tokens"
        if target.needs_data()
        else "calibration  none (data-free method)",
        f"engine       sequential on {device}, compute {str(compute).removeprefix('torch.')}, "
        f"--propagate {recipe.propagate}",
        f"checkpoint   {ckpt / 1e9:.3f} GB; output about {out_size / 1e9:.3f} GB; "
        f"{shutil.disk_usage(probe).free / 1e9:.1f} GB free at {probe}",
        f"memory       about {est / 1e9:.3f} GB beyond the Python/torch baseline (one layer "
        f"{layer_elems * compute.itemsize / 1e9:.3f} GB + activations {acts / 1e9:.3f} GB)",
    ]
    if target.needs_data() and recipe.calibration == "self":
        whole = sum(src.tensors.info(n)[0] for n in src.tensors.names()) * compute.itemsize
        lines.append(
            f"note         --calibration self loads the whole model once to sample (about "
            f"{whole / 1e9:.3f} GB in the compute dtype); give a .jsonl/.txt to stay within "
            "the estimate above"
        )
    return "\n".join(lines)
