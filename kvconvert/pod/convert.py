"""``--target pod``: calibrate a layer map (or read one), then write the PoD checkpoint.

The weights are copied unchanged; the output's config names the PoD remote code (copied in)
and carries the map. ``kvconvert.json`` records the map, the similarity matrix and the
predicted KV saving.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import report as report_mod
from ..compat import stamp_config
from ..recipe import Recipe, parse_size
from ..writer import ShardedWriter, atomic_output, cast_float, copy_side_files, write_json
from .card import pod_model_card
from .checkpoint import copy_modeling_files, pod_config
from .layermap import (
    blocks_for_saving,
    blocks_from_threshold,
    describe,
    load_map,
    num_blocks,
    predicted_saving,
)
from .similarity import NUM_QUERIES, layer_similarity


def sliding_windows(src: Any) -> list[int | None]:
    """Per layer, the window of a sliding-window layer that keeps the stock sliding cache and
    never shares (stock-architecture PoD outputs only; the Llama-layout PoD model keeps full
    caches everywhere, so every layer may share there)."""
    if not src.adapter.pod_models.get(src.config.get("model_type")):
        return [None] * src.num_layers
    from transformers import AutoConfig

    from ..modeling.configuration_kvconvert_pod import sliding_windows as stock_rule

    return stock_rule(AutoConfig.from_pretrained(src.folder))


def choose_map(
    recipe: Recipe,
    similarity: np.ndarray,
    context: int,
    windows: list[int | None] | None = None,
) -> tuple[list[list[int]], str]:
    """The layer map from similarities: a saving target if given, else the threshold."""
    if recipe.kv_saving is not None:
        pod_map = blocks_for_saving(
            similarity,
            recipe.kv_saving,
            recipe.sink,
            recipe.recent,
            context,
            recipe.max_block,
            recipe.keep_first,
            windows,
        )
        return pod_map, f"kv_saving {recipe.kv_saving} at {context} tokens"
    pod_map = blocks_from_threshold(
        similarity, recipe.threshold, recipe.max_block, recipe.keep_first, windows
    )
    return pod_map, f"threshold {recipe.threshold}"


def convert_pod(
    recipe: Recipe, src: Any, output: Path, progress: bool, command: str | None, t0: float
) -> Path:
    """Run ``--target pod`` (or ``gqa,pod``) for a resolved ``pipeline.Source``."""
    if recipe.target == "gqa,pod":
        return _merge_then_pod(recipe, src, output, progress, command, t0)
    return _pod(recipe, src, output, progress, command, t0)


def _merge_then_pod(
    recipe: Recipe, src: Any, output: Path, progress: bool, command: str | None, t0: float
) -> Path:
    """Merge KV heads into a temporary GQA checkpoint, then compute the map on it."""
    from ..pipeline import Source, _convert

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.gqa-", dir=output.parent) as tmp:
        stage = Path(tmp) / "gqa"
        merge = dataclasses.replace(recipe, target="gqa", output=str(stage), overwrite=False)
        _convert(merge, src, stage, progress, command, t0)
        merged = Source(dataclasses.replace(recipe, model=str(stage), revision=None), progress)
        try:
            gqa = json.loads((stage / "kvconvert.json").read_text())
            return _pod(recipe, merged, output, progress, command, t0, gqa)
        finally:
            merged.tensors.close()


def _pod(
    recipe: Recipe,
    src: Any,
    output: Path,
    progress: bool,
    command: str | None,
    t0: float,
    gqa: dict[str, Any] | None = None,
) -> Path:
    from ..pipeline import calibration_tokens, load_model, report_header, resolve_device

    L, kv = src.num_layers, src.num_kv_heads
    device = resolve_device(recipe.device)
    out_dtype = None if recipe.dtype == "auto" else getattr(torch, recipe.dtype)
    torch.manual_seed(recipe.seed)
    similarity = None
    windows = sliding_windows(src)
    calib_info: dict[str, Any] = {"source": "none (--pod-map given)", "sequences": 0, "seq_len": 0}
    if recipe.pod_map:
        pod_map = load_map(recipe.pod_map, L, kv, windows)
        context = recipe.context or recipe.seq_len
        how = f"file {recipe.pod_map}"
    else:
        compute_dtype = torch.float32 if device.type == "cpu" else src.dtype
        model = load_model(src.folder, device, compute_dtype, recipe.trust_remote_code)
        tokens = calibration_tokens(recipe, model, src, progress)
        similarity = layer_similarity(
            model,
            src.adapter,
            src.config,
            tokens,
            recipe.sink,
            recipe.recent,
            recipe.batch_size,
            progress,
            windows,
        )
        del model
        calib_info = {
            "source": recipe.calibration,
            "sequences": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "seed": recipe.seed,
            "queries_per_sequence": NUM_QUERIES,
        }
        context = recipe.context or int(tokens.shape[1])
        pod_map, how = choose_map(recipe, similarity, context, windows)
    t_calib = time.perf_counter() - t0
    saving = predicted_saving(pod_map, recipe.sink, recipe.recent, context, windows)

    with atomic_output(output, recipe.overwrite) as work:
        writer = ShardedWriter(work, parse_size(recipe.max_shard_size))
        renames = src.adapter.load_renames  # the remote code loads without them
        for name in src.tensors.names():
            writer.add(renames.get(name, name), cast_float(src.tensors.get(name), out_dtype))
        shards = writer.finish()
        config = pod_config(
            src.config,
            src.folder,
            src.adapter,
            set(src.tensors.names()),
            pod_map,
            recipe.sink,
            recipe.recent,
            recipe.trust_remote_code,
        )
        if out_dtype is not None:
            config["dtype"] = recipe.dtype
            config.pop("torch_dtype", None)
        write_json(work / "config.json", stamp_config(config))
        side = copy_side_files(src.folder, work)
        code = copy_modeling_files(work)
        final_dtype = out_dtype or src.dtype
        dense = report_mod.kv_bytes_per_token([kv] * L, src.head_dim, final_dtype)
        # what the stock cache holds at ``context`` (a sliding layer: its window only)
        tokens = sum(context if w is None else min(context, w - 1) for w in windows)
        held = dense // L * tokens
        rep = {
            **report_header(recipe, src, command, kv),
            "target": {
                "kind": "pod",
                "sink": recipe.sink,
                "recent": recipe.recent,
                "pod_map": pod_map,
                "blocks": describe(pod_map),
                "num_head_blocks": num_blocks(pod_map),
                "map_from": how,
                "context": context,
                "predicted_kv_saving": saving,
            },
            "similarity": {
                "what": "1 - JSD (base 2) of distant-token attention, rows: layers (l, l+1), "
                "columns: KV heads",
                "matrix": None
                if similarity is None
                else [
                    [None if np.isnan(x) else round(float(x), 6) for x in row] for row in similarity
                ],
            },
            "calibration": calib_info,
            "kv_bytes": {
                "dense_per_token": dense,
                "at_context": {
                    "tokens": context,
                    "dense": held,
                    "pod": round(held * (1 - saving)),
                },
                "dtype": str(final_dtype).removeprefix("torch."),
            },
            "files": {"weights": shards, "copied": side, "remote_code": code},
            "timing_s": {
                "calibration": round(t_calib, 3),
                "total": round(time.perf_counter() - t0, 3),
            },
        }
        if gqa is not None:  # heads were merged first: record that stage too
            rep["source"] = gqa["source"]
            rep["gqa"] = {
                k: gqa[k] for k in ("target", "calibration", "layers", "kv_bytes_per_token")
            }
            before = gqa["kv_bytes_per_token"]["before"]
            rep["kv_bytes"]["at_context"]["original"] = before // L * tokens
        write_json(work / "kvconvert.json", rep)
        card = pod_model_card(rep, report_mod.base_model_id(recipe, src.config))
        (work / "README.md").write_text(report_mod.without_local_paths(card, recipe))
    return output
