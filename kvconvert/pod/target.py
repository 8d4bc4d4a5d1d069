"""``--target pod``: calibrate a layer map (or read one), then write the PoD checkpoint.

The whole-model engine hands this target the loaded source model; it measures how alike
consecutive layers' distant-token attention is (``similarity.py``), chooses the map
(``layermap.py``) and copies the weights unchanged; the output's config names the PoD remote
code (copied in) and carries the map. ``kvconvert.json`` records the map, the similarity matrix
and the predicted KV saving. The method is in docs/pod.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .. import report as report_mod
from ..arch import held_tokens
from ..arch import sliding_windows as stock_windows
from ..compat import stamp_config
from ..errors import KVConvertError
from ..recipe import Recipe
from ..source import Source
from ..target import RunInfo, Target
from ..writer import cast_float, copy_side_files, write_json
from .card import pod_model_card
from .checkpoint import copy_modeling_files, pod_config
from .cost import DEPTH, NUM_QUERIES_COST, borrow_cost
from .layermap import (
    bias_per_head,
    blocks_by_cost,
    blocks_for_saving,
    blocks_from_threshold,
    describe,
    load_map,
    num_blocks,
    predicted_saving,
)
from .similarity import NUM_QUERIES, layer_similarity


def sliding_windows(src: Source) -> list[int | None]:
    """Per layer, the window of a sliding-window layer that keeps the stock sliding cache and
    never shares (stock-architecture PoD outputs only; the Llama-layout PoD model keeps full
    caches everywhere, so every layer may share there)."""
    if not src.adapter.pod_models.get(src.config.get("model_type")):
        return [None] * src.num_layers
    from transformers import AutoConfig

    return stock_windows(AutoConfig.from_pretrained(src.folder).get_text_config())


def map_by(recipe: Recipe) -> str:
    """``cost`` or ``similarity``: what orders the merges (``--map-by``, auto resolved)."""
    if recipe.map_by != "auto":
        return recipe.map_by
    return "cost" if recipe.kv_saving is not None else "similarity"


def choose_map(
    recipe: Recipe,
    similarity: np.ndarray | None,
    context: int,
    windows: list[int | None] | None = None,
    cost: np.ndarray | None = None,
) -> tuple[list[list[int]], str]:
    """The layer map: the least borrowing cost for a saving target (``cost``), else from
    similarities: the most similar merges for a saving target, or the threshold."""
    if recipe.kv_saving is not None:
        by_cost = cost is not None
        pod_map = (blocks_by_cost if by_cost else blocks_for_saving)(
            cost if by_cost else similarity,
            recipe.kv_saving,
            recipe.sink,
            recipe.recent,
            context,
            recipe.max_block,
            recipe.keep_first,
            windows,
        )
        order = "least borrowing cost" if by_cost else "most similar first"
        return pod_map, f"kv_saving {recipe.kv_saving} at {context} tokens, {order}"
    assert similarity is not None
    pod_map = blocks_from_threshold(
        similarity, recipe.threshold, recipe.max_block, recipe.keep_first, windows
    )
    return pod_map, f"threshold {recipe.threshold}"


#: ``--context`` by default: the model's maximum context, at most this many tokens
CONTEXT_CAP = 32768
#: context lengths the report and the card give the saving at (those within the model's)
SAVING_AT = (2048, 4096, 8192, 16384, 32768)


def model_context(config: dict[str, Any]) -> int | None:
    """The longest context the source model declares, if any."""
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def default_context(config: dict[str, Any], seq_len: int) -> int:
    """What ``--kv-saving`` means when ``--context`` is not given: the saving at the model's
    maximum context (at most ``CONTEXT_CAP``), where a user serves long prompts; the
    calibration length where the model declares none."""
    declared = model_context(config)
    return seq_len if declared is None else min(declared, CONTEXT_CAP)


def savings_at(
    pod_map: list[list[int]],
    sink: int,
    recent: int,
    context: int,
    declared: int | None,
    windows: list[int | None] | None = None,
) -> dict[str, float]:
    """The predicted saving at a few context lengths up to the model's, and at ``context``."""
    lengths = {t for t in SAVING_AT if declared is None or t <= declared} | {context}
    return {
        str(t): round(predicted_saving(pod_map, sink, recent, t, windows), 6)
        for t in sorted(lengths)
    }


def auto_recent(config: dict[str, Any], seq_len: int, sink: int) -> tuple[int, str]:
    """The default ``--recent``: the model's context / 8 - sink (the PoD paper's 4080 of 32K),
    capped at seq_len / 2 - sink so that half of each calibration sequence is distant; and
    a line saying which bound chose it."""
    context = model_context(config) or seq_len
    by_context, by_calibration = int(context) // 8 - sink, seq_len // 2 - sink
    recent = min(by_context, by_calibration)
    if recent < 1:
        raise KVConvertError(
            f"recent: no default fits sink {sink} (context {context} / 8 - sink = {by_context}, "
            f"--seq-len {seq_len} / 2 - sink = {by_calibration}); give --recent N and a "
            f"--seq-len above sink + N + 1, or a smaller --sink"
        )
    if by_context <= by_calibration:
        why = f"default: context {context} / 8 - sink {sink}"
    else:
        why = (
            f"default: calibration --seq-len {seq_len} / 2 - sink {sink} (the context's bound, "
            f"{by_context}, needs --seq-len {2 * (by_context + sink)} or more)"
        )
    return recent, why


class PodTarget(Target):
    """``merged_from``: the kvconvert.json of a GQA stage this source is (``--target gqa,pod``:
    the conductor merges heads first, then runs this target on the merged checkpoint)."""

    name = "pod"
    no_data = "none (--pod-map given)"

    def __init__(self, src: Source, recipe: Recipe, merged_from: dict[str, Any] | None = None):
        super().__init__(src, recipe)
        self.recent_from = "--recent"
        if recipe.recent is None:
            recent, self.recent_from = auto_recent(src.config, recipe.seq_len, recipe.sink)
            self.recipe = recipe = replace(recipe, recent=recent)
        self.gqa = merged_from
        self.windows = sliding_windows(src)
        self.similarity: np.ndarray | None = None
        self.cost: np.ndarray | None = None
        #: per (layer, KV head), the bias on borrowed distant logits (``--distant-bias``)
        self.distant_bias: list[list[float]] | None = None
        if recipe.pod_map:
            self.pod_map = load_map(recipe.pod_map, src.num_layers, src.num_kv_heads, self.windows)
            self.context = recipe.context or default_context(src.config, recipe.seq_len)
            self.how = f"file {recipe.pod_map}"

    def needs_data(self) -> bool:
        return not self.recipe.pod_map

    def observe(
        self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, progress: bool
    ) -> None:
        src, recipe = self.src, self.recipe
        self.context = recipe.context or default_context(src.config, int(tokens.shape[1]))
        probe = (model, src.adapter, src.config, tokens, recipe.sink, recipe.recent)
        grid = recipe.distant_biases()  # only with the cost map (Recipe.validate)
        if map_by(recipe) == "cost":  # measures the similarity too, in the same pass
            depth = DEPTH if recipe.max_block is None else min(DEPTH, recipe.max_block - 1)
            self.cost, bias, self.similarity = borrow_cost(
                *probe, recipe.batch_size, max(depth, 1), progress, self.windows, grid or (0.0,)
            )
        else:
            self.similarity = layer_similarity(*probe, recipe.batch_size, progress, self.windows)
        self.pod_map, self.how = choose_map(
            recipe, self.similarity, self.context, self.windows, self.cost
        )
        if grid:
            self.distant_bias = bias_per_head(self.pod_map, bias, self.windows)

    def tensors(
        self, device: torch.device, out_dtype: torch.dtype | None, progress: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The source's weights unchanged (cast to ``--dtype``), named as the remote code
        loads them."""
        renames = self.src.adapter.load_renames
        for name in self.src.tensors.names():
            yield renames.get(name, name), cast_float(self.src.tensors.get(name), out_dtype)

    def finish(self, run: RunInfo) -> None:
        src, recipe, windows, context = self.src, self.recipe, self.windows, self.context
        L, kv, similarity = src.num_layers, src.num_kv_heads, self.similarity
        work, out_dtype, calibration = run.work, run.out_dtype, run.calibration
        if self.cost is not None:
            calibration = {**calibration, "queries_per_sequence": NUM_QUERIES_COST}
        elif similarity is not None:
            calibration = {**calibration, "queries_per_sequence": NUM_QUERIES}
        saving = predicted_saving(self.pod_map, recipe.sink, recipe.recent, context, windows)
        config = pod_config(
            src.config,
            src.folder,
            src.adapter,
            set(src.tensors.names()),
            self.pod_map,
            recipe.sink,
            recipe.recent,
            recipe.trust_remote_code,
            self.distant_bias,
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
        tokens = sum(held_tokens(context, w) for w in windows)
        held = dense // L * tokens
        rep = {
            **report_mod.report_header(recipe, src, run.command, kv),
            "target": {
                "kind": "pod",
                "sink": recipe.sink,
                "recent": recipe.recent,
                "recent_from": self.recent_from,
                "pod_map": self.pod_map,
                "blocks": describe(self.pod_map),
                "num_head_blocks": num_blocks(self.pod_map),
                "map_from": self.how,
                "map_by": None if recipe.pod_map else map_by(recipe),
                "context": context,
                "predicted_kv_saving": saving,
                "saving_at": savings_at(
                    self.pod_map,
                    recipe.sink,
                    recipe.recent,
                    context,
                    model_context(src.config),
                    windows,
                ),
                "distant_bias": self.distant_bias,
                "distant_bias_grid": list(recipe.distant_biases()) or None,
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
            "borrow_cost": {
                "what": "relative residual error of layer l, KV head h reading its distant keys "
                "from the layer d links below; [l][h][d - 1] (docs/pod.md)",
                "matrix": None
                if self.cost is None
                else [
                    [[None if np.isnan(x) else round(float(x), 6) for x in d] for d in row]
                    for row in self.cost
                ],
            },
            "calibration": calibration,
            "kv_bytes": {
                "dense_per_token": dense,
                "at_context": {
                    "tokens": context,
                    "dense": held,
                    "pod": round(held * (1 - saving)),
                },
                "dtype": str(final_dtype).removeprefix("torch."),
            },
            "files": {"weights": run.shards, "copied": side, "remote_code": code},
            "timing_s": {
                "calibration": round(run.t_calib, 3),
                "total": round(time.perf_counter() - run.t0, 3),
            },
        }
        if self.gqa is not None:  # heads were merged first: record that stage too
            gqa = self.gqa
            rep["source"] = gqa["source"]
            rep["gqa"] = {
                k: gqa[k] for k in ("target", "calibration", "layers", "kv_bytes_per_token")
            }
            before = gqa["kv_bytes_per_token"]["before"]
            rep["kv_bytes"]["at_context"]["original"] = before // L * tokens
        write_json(work / "kvconvert.json", rep)
        text = report_mod.write_recipe(work, recipe, rep, src.folder)
        card = pod_model_card(
            rep,
            report_mod.base_model_id(recipe, src.config),
            report_mod.source_card_metadata(src.folder),
            text,
        )
        (work / "README.md").write_text(report_mod.without_local_paths(card, recipe, rep))
