"""``--target gqa``: merge KV heads, per layer, from the layer's second moments.

The engines hand this target statistics (whole model: ``observe`` collects every layer's at
once; layer-sequential: one layer's at a time through ``solve_layer``); it solves each layer
(``layer.py``, ``project.py``), writes the new attention tensors and describes the output:
stock config with fewer KV heads, or kvconvert's model code for per-layer counts and projected
keys. The method is in docs/methods.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import report as report_mod
from ..arch import llama_decoder_types
from ..calibration.data import batches
from ..calibration.samples import AttentionSamples
from ..calibration.stats import LayerStats, StatsCollector
from ..compat import stamp_config
from ..errors import KVConvertError
from ..modeling import DECI_FILES
from ..modeling import export as remote
from ..recipe import Recipe
from ..source import Source
from ..target import LayerContext, RunInfo, SolvedLayer, Target
from ..writer import cast_float, copy_side_files, write_json
from . import budget as budget_mod
from . import grouping as grouping_mod
from . import refine as refine_mod
from .card import write_recipe_and_card
from .fold import AttentionWeights
from .layer import (
    LayerResult,
    check_finite,
    layer_counts,
    layer_record,
    layer_shape,
    layer_tensors,
    layer_weights,
    merge_layer,
    needs_remote_code,
    to_float64,
)
from .project import ProjectedLayerResult, RotatedStatsCollector, project_layer

#: --refine-steps where the run calibrates: on SmolLM2 (3 -> 1 KV heads) 40 steps at the
#: default lr take the layers' held-out output error from 0.60 to 0.24, 100 to 0.23.
REFINE_STEPS = 50


class GQATarget(Target):
    name = "gqa"
    no_data = "none (data-free method)"

    def __init__(self, src: Source, recipe: Recipe):
        super().__init__(src, recipe)
        self.counts = layer_counts(src, recipe)
        if recipe.format == "deci" and (unfit := self.deci_unfit()):
            raise KVConvertError(f"--format deci: {unfit}")
        self.shape = layer_shape(src)
        if recipe.refine_steps and not src.adapter.llama_decoder:
            raise KVConvertError(
                f"--refine-steps is not available for {src.config.get('model_type')!r} yet "
                f"(supported: {', '.join(llama_decoder_types())}); use --refine-steps 0"
            )
        self.stats: dict[int, LayerStats] | None = None
        self.allocation: budget_mod.Allocation | None = None
        #: per-layer records of the whole-model engine's run (kvconvert.json "layers")
        self.results: dict[int, dict[str, Any]] = {}
        self._kv_names = {
            src.adapter.tensor_name(i, p, kind): i
            for i in range(src.num_layers)
            for p in ("k", "v")
            for kind in ("weight", "bias")
        }
        self.refined: dict[int, refine_mod.Refined] = {}

    def needs_data(self) -> bool:
        r = self.recipe
        return r.method == "svd" or r.kv_budget is not None or self.refine_steps() > 0

    def refine_steps(self) -> int:
        """--refine-steps, or its default: REFINE_STEPS where the run calibrates anyway and
        the model's attention can be rebuilt in-process (``adapter.llama_decoder``), else 0."""
        r = self.recipe
        if r.refine_steps is not None:
            return r.refine_steps
        calibrates = r.method == "svd" or r.kv_budget is not None
        return REFINE_STEPS if calibrates and self.src.adapter.llama_decoder else 0

    def refines(self, layer: int) -> bool:
        """Whether ``layer`` is refined: it is merged, and refinement is on."""
        return self.counts[layer] < self.src.num_kv_heads and self.refine_steps() > 0

    def why_not_layer_by_layer(self) -> str | None:
        recipe, adapter = self.recipe, self.src.adapter
        if recipe.kv_heads is None or len(set(self.counts)) > 1 or recipe.kv_budget is not None:
            return "per-layer KV head counts (--kv-budget, --kv-heads-per-layer)"
        if recipe.rope_keys == "project":
            return "--rope-keys project"
        if adapter.qkv_proj or adapter.q_norm or adapter.k_norm:
            return f"the {adapter.name} attention layout (fused qkv or q/k norms)"
        if adapter.remote_family is not None:
            return f"the {adapter.name} architecture (its output uses kvconvert's modeling code)"
        return None

    # --- measuring -------------------------------------------------------------------------
    @torch.inference_mode()
    def collect_stats(
        self, model: torch.nn.Module, tokens: torch.Tensor, progress: bool
    ) -> dict[int, LayerStats]:
        """Per-layer second moments; keys and queries after RoPE for --rope-keys project."""
        src, batch_size = self.src, self.recipe.batch_size
        device = next(model.parameters()).device
        collector = RotatedStatsCollector if self.recipe.rope_keys == "project" else StatsCollector
        with collector(model, src.adapter, src.config) as col:
            n = (tokens.shape[0] + batch_size - 1) // batch_size
            for batch in tqdm(
                batches(tokens, batch_size), total=n, desc="calibrating", disable=not progress
            ):
                model(input_ids=batch.to(device), use_cache=False)
        return col.result()

    def observe(
        self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, progress: bool
    ) -> None:
        if self.recipe.method == "svd":
            self.stats = self.collect_stats(model, tokens, progress)
        if self.recipe.kv_budget is not None:
            self.allocation = self.allocate_budget(model, tokens, device, progress)
            self.counts = self.allocation.counts
        if any(self.refines(i) for i in range(self.src.num_layers)):
            self.refine_layers(model, tokens, device, progress)

    def allocate_budget(
        self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, progress: bool
    ) -> budget_mod.Allocation:
        """--kv-budget: measure each layer's sensitivity on calibration data, then solve."""
        src, recipe = self.src, self.recipe
        kv = src.num_kv_heads
        impl = model.config._attn_implementation
        dtype = next(model.parameters()).dtype

        def merged(i: int, c: int) -> torch.nn.Module:
            """Layer i's attention merged to c KV heads, as a module of the calibration model."""
            return self.merged_module(i, self.solve(i, c, device), impl, device, dtype)

        def swap(i: int, c: int):
            parent_name, attr = src.attention_path(i).rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
            setattr(parent, attr, merged(i, c))
            return lambda: setattr(parent, attr, old)

        data, candidates = tokens[: recipe.budget_samples], budget_mod.divisors(kv)
        if recipe.budget_sensitivity == "fisher":
            attentions = [model.get_submodule(src.attention_path(i)) for i in range(src.num_layers)]
            sens = budget_mod.fisher_sensitivities(
                model,
                data,
                attentions,
                candidates,
                merged,
                recipe.batch_size,
                seed=recipe.seed,
                progress=progress,
            )
        else:
            sens = budget_mod.measure_sensitivities(
                model, data, src.num_layers, candidates, swap, recipe.batch_size, progress
            )
        return budget_mod.allocate(sens, kv, recipe.kv_budget)

    def merged_module(
        self,
        layer: int,
        res: LayerResult,
        impl: str | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.nn.Module:
        """A solved layer's attention as a module that runs in place of the original's."""
        counts = [self.src.num_kv_heads] * self.src.num_layers
        counts[layer] = len(res.groups)
        cfg = self.remote_config(counts)
        tensors = {k: v for k, v in layer_tensors(res).items() if v is not None}
        return remote.attention_module(cfg, layer, tensors, impl).to(device=device, dtype=dtype)

    # --- refining -------------------------------------------------------------------------
    def refine_layers(
        self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, progress: bool
    ) -> None:
        """Refine every merged layer on the original model's activations (whole-model
        engine)."""

        def fit(i: int, samples: AttentionSamples, attn: torch.nn.Module) -> refine_mod.Refined:
            res = self.solve(i, self.counts[i], device)
            return self.refine(i, res, samples, refine_mod.Runs.of(attn))

        todo = [i for i in range(self.src.num_layers) if self.refines(i)]
        self.refined = refine_mod.refine_on_model(
            model, tokens, self.src, todo, self.recipe.batch_size, fit, progress
        )

    def refine(
        self,
        layer: int,
        res: LayerResult,
        samples: AttentionSamples,
        runs: refine_mod.Runs,
        world: int = 1,
    ) -> refine_mod.Refined:
        """Fit the solved layer's attention to ``samples`` (what the original attention
        produced), run as the original ran (``runs``). The merge's tensors leave ``res`` for
        the fit (memory: one copy of the layer, not two); where the fit does not help
        (``Refined.tensors`` empty) solve again for the merge as solved."""
        module = self.merged_module(layer, res, runs.impl, runs.device, runs.dtype)
        res.weights = AttentionWeights.from_items(dict.fromkeys(res.weights.items()))
        lr = self.recipe.refine_lr or refine_mod.DEFAULT_LR
        rows = self.recipe.refine_rows
        return refine_mod.refine(module, samples, self.refine_steps(), lr, world, rows)

    @staticmethod
    def apply_refined(res: LayerResult, refined: refine_mod.Refined) -> None:
        """Put the refined tensors into ``res``, and the fit's errors."""
        items = res.weights.items()
        for key, t in refined.tensors.items():
            old = items[key]
            items[key] = t if old is None else t.to(device=old.device, dtype=old.dtype)
        res.weights = AttentionWeights.from_items(items)
        res.refine_error = (refined.before, refined.after)

    # --- solving ---------------------------------------------------------------------------
    def solve(
        self,
        layer: int,
        kv_heads: int,
        device: torch.device,
        weights: AttentionWeights | None = None,
        stats: LayerStats | None = None,
    ) -> LayerResult:
        """Merge one layer to ``kv_heads`` KV heads with the recipe's method (float64 result);
        ``stats``: the layer's (else the whole-model engine's, if it collected them)."""
        r = self.recipe
        w = to_float64(weights or layer_weights(self.src, layer), device)
        st = stats if stats is not None else (self.stats or {}).get(layer)
        if r.rope_keys == "project":
            return project_layer(
                w, st, self.shape, kv_heads, r.method, r.objective, r.grouping, r.seed
            )
        return merge_layer(
            w, st, self.shape, kv_heads, r.method, r.rope_keys, r.objective, r.grouping, r.seed
        )

    def wants_samples(self, layer: int) -> bool:
        """Refinement fits a merged layer to what the original attention produced."""
        return self.refines(layer)

    def layer_overrides(self, layer: int) -> dict[str, Any]:
        return {"num_key_value_heads": self.counts[layer]}

    def output_fraction(self, name: str) -> float:
        """Merged key and value projections are ``kv_heads / source KV heads`` of their size."""
        if name not in self._kv_names:
            return 1.0
        i = self._kv_names[name]
        return self.counts[i] / self.src.num_kv_heads

    def solve_layer(self, ctx: LayerContext) -> SolvedLayer:
        """Solve one layer (layer-sequential engine); refine it on ``ctx.samples``, what the
        original attention ``ctx.original`` produced on the calibration activations."""
        layer = ctx.layer
        w = layer_weights(self.src, layer, ctx.read)
        for key, t in w.items().items():
            if t is not None and t.is_floating_point() and not t.isfinite().all():
                raise KVConvertError(f"layer {layer}: source tensor {key} contains NaN/inf")
        refining = ctx.samples is not None and self.refines(layer)
        # the fit needs only how the original attention ran: its weights are freed before the
        # solve and the fit make their own (docs/scale.md, "Refinement's cost")
        runs = refine_mod.Runs.of(ctx.original) if refining else None
        ctx.original = None
        res = self.solve(layer, self.counts[layer], ctx.device, w, ctx.stats)
        if refining:
            refined = self.refine(layer, res, ctx.samples, runs, ctx.world)
            if not refined.tensors:  # the fit did not help: the merge as solved
                res = self.solve(layer, self.counts[layer], ctx.device, w, ctx.stats)
            self.apply_refined(res, refined)
        new = res.weights.items()
        check_finite(layer, new)
        orig = w.items()
        names = self.src.attention_tensor_names(layer)
        out = ctx.out_dtype
        solved = {name: new[key].to(out or orig[key].dtype) for name, key in names.items()}
        return SolvedLayer(solved, layer_record(res))

    def tensors(
        self, device: torch.device, out_dtype: torch.dtype | None, progress: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor in checkpoint order: attention layers solved lazily, one at a
        time.

        A layer is solved when its first attention tensor is reached, and all of its attention
        tensors are written then, named as the output's layout has them (``output_adapter``:
        the source's, or e.g. GPT-NeoX's fused qkv as separate projections); memory holds one
        layer's solution, not the model's.
        """
        src, results = self.src, self.results
        owner = {name: i for i in range(src.num_layers) for name in src.attention_tensor_names(i)}
        out_adapter = src.stored.output_adapter()
        renames = src.adapter.load_renames if src.adapter.remote_family else {}  # remote code
        bar = tqdm(total=src.num_layers, desc="solving layers", unit="layer", disable=not progress)
        for name in src.tensors.names():
            if name not in owner:
                yield renames.get(name, name), cast_float(src.tensors.get(name), out_dtype)
                continue
            i = owner[name]
            if i in results:  # written with the layer's first attention tensor
                continue
            orig = layer_weights(src, i).items()
            res = self.solve(i, self.counts[i], device)
            if i in self.refined:
                self.apply_refined(res, self.refined.pop(i))
            new = res.weights.items()
            check_finite(i, new)
            new = {
                k: v if v is None else v.to(out_dtype or getattr(orig.get(k), "dtype", src.dtype))
                for k, v in new.items()
            }
            names = out_adapter.layer_tensor_names(i)
            for role, t in out_adapter.join(new, src.head_dim).items():
                if t is not None:
                    yield names[role], t
            results[i] = layer_record(res)
            bar.update(1)
            if isinstance(res, ProjectedLayerResult):  # run-time key projection
                for extra, t in res.extra_tensors().items():
                    yield f"{src.attention_path(i)}.{extra}", t.to(out_dtype or src.dtype)
        bar.close()

    # --- describing the output -------------------------------------------------------------
    def biases(self) -> dict[str, bool]:
        """Which of q/k/v/o carry a bias in the source."""
        src = self.src
        return {p: src.stored.tensor_name(0, p, "bias") in src.tensors for p in "qkvo"}

    def remote_config(self, counts: list[int]) -> dict[str, Any]:
        src = self.src
        proj = [src.num_kv_heads if self.recipe.rope_keys == "project" else 0] * src.num_layers
        return remote.remote_config(src.config, counts, proj, self.biases())

    def layout(self, counts: list[int]) -> tuple[str, str | None]:
        """The output's format and, when --format auto could not use deci, why (one line):
        "stock" (uniform heads), "deci" (DeciLM layout) or "kvconvert" (own model code)."""
        if self.src.adapter.remote_family is not None:
            return "kvconvert", None  # the architecture's GQA needs kvconvert's model code
        if not needs_remote_code(self.recipe, counts):
            return "stock", None
        if self.recipe.format == "kvconvert":
            return "kvconvert", None
        unfit = self.deci_unfit()
        return ("kvconvert", f"not the deci layout: {unfit}") if unfit else ("deci", None)

    def deci_unfit(self) -> str | None:
        """Why this source and recipe cannot take the DeciLM layout, or None."""
        projected = self.recipe.rope_keys == "project"
        llama = self.src.adapter.llama_decoder
        return remote.deci_unfit(self.src.config, self.biases(), projected, llama)

    def report(self, layout: str, note: str | None) -> dict[str, Any]:
        """kvconvert.json "target": per-layer counts, format, key projection, the budget's
        evidence."""
        counts, src, recipe = self.counts, self.src, self.recipe
        out: dict[str, Any] = {
            "kind": "gqa",
            "num_key_value_heads": counts[0] if len(set(counts)) == 1 else counts,
            "remote_code": layout != "stock",
            "format": layout,
        }
        if note:
            out["format_note"] = note
        if src.adapter.remote_family is not None:  # which engines serve it (docs/serving.md)
            out["model_code"] = src.adapter.remote_family.model_type
        if recipe.rope_keys == "project":
            out["key_projection_heads"] = [src.num_kv_heads] * src.num_layers
        if self.allocation is not None:
            out["budget"] = {"fraction": recipe.kv_budget, **self.allocation.to_dict()}
        return out

    def dry_run_lines(self, out_dtype: torch.dtype | None) -> list[str]:
        """What --dry-run prints about the target (the engine adds cost and memory)."""
        src, recipe = self.src, self.recipe
        final = out_dtype or src.dtype
        before = report_mod.kv_bytes_per_token(
            [src.num_kv_heads] * src.num_layers, src.head_dim, src.dtype
        )
        after = report_mod.kv_bytes_per_token(self.counts, src.head_dim, final)
        groups = (
            str([list(g) for g in grouping_mod.adjacent(src.num_kv_heads, recipe.kv_heads)])
            if recipe.grouping == "adjacent"
            else "searched per layer"
        )
        return [
            f"target       gqa: {src.num_kv_heads} -> {recipe.kv_heads} KV heads per layer, "
            f"method {recipe.method}",
            f"groups       {groups}",
            f"KV cache     {before} -> {after} bytes per token "
            f"({str(final).removeprefix('torch.')})",
            self.refine_line(),
        ]

    def refine_line(self) -> str:
        """--dry-run's line on --refine-steps: what it does and its share of the work."""
        r, steps = self.recipe, self.refine_steps()
        if not steps:
            return "refine       off"
        rows = min(r.refine_rows or r.seq_len, r.seq_len)
        share = refine_mod.arithmetic_share(
            self.src.config, self.counts, r.num_samples * r.seq_len, r.seq_len, r.batch_size,
            steps, r.refine_rows,
        )  # fmt: skip
        return (
            f"refine       {steps} Adam steps per merged layer at {rows} of {r.seq_len} query "
            f"positions: about {share:.0%} of the conversion's arithmetic (--refine-rows, "
            "--refine-steps 0 to skip; docs/scale.md)"
        )

    def finish(self, run: RunInfo) -> None:
        src, recipe, counts, work = self.src, self.recipe, self.counts, run.work
        results = run.layers or self.results
        family = src.adapter.remote_family  # the architecture's GQA needs kvconvert's model code
        layout, note = self.layout(counts)
        if note:
            print(f"format: {note}; writing kvconvert's own model code", file=sys.stderr)
        if family is not None:
            config = remote.family_config(src.config, family, counts[0])
            model_files = remote.copy_model_files(work, family.files)
        elif layout == "deci":
            config = remote.deci_config(src.config, counts)
            model_files = remote.copy_model_files(work, DECI_FILES)
        elif layout == "kvconvert":
            config = self.remote_config(counts)
            model_files = remote.copy_model_files(work)
        else:
            config = src.adapter.set_kv_heads(src.config, counts[0])
            model_files = []
        if run.out_dtype is not None:
            config["dtype"] = recipe.dtype
            config.pop("torch_dtype", None)
        write_json(work / "config.json", stamp_config(config))
        side = copy_side_files(src.folder, work)
        final_dtype = run.out_dtype or src.dtype
        rep = {
            **report_mod.report_header(recipe, src, run.command),
            "target": self.report(layout, note),
            "calibration": run.calibration,
            "layers": [{"layer": i, **results[i]} for i in sorted(results)],
            "kv_bytes_per_token": {
                "before": report_mod.kv_bytes_per_token(
                    [src.num_kv_heads] * src.num_layers, src.head_dim, src.dtype
                ),
                "after": report_mod.kv_bytes_per_token(counts, src.head_dim, final_dtype),
                "dtype": str(final_dtype).removeprefix("torch."),
            },
            "files": {"weights": run.shards, "copied": side, "model_code": model_files},
            "timing_s": {
                "calibration": round(run.t_calib, 3),
                "total": round(time.perf_counter() - run.t0, 3),
            },
        }
        write_json(work / "kvconvert.json", rep)
        write_recipe_and_card(work, recipe, rep, src.folder, config)
