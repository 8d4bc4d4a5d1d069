"""``--target gqa``: merge KV heads, per layer, from the layer's second moments.

The engines hand this target statistics (whole model: ``observe`` collects every layer's at
once; layer-sequential: one layer's at a time through ``solve_layer``); it solves each layer
(``layer.py``, ``project.py``), writes the new attention tensors and describes the output:
stock config with fewer KV heads, or kvconvert's model code for per-layer counts and projected
keys. The method is in docs/methods.md.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import report as report_mod
from ..calibration.data import batches
from ..calibration.samples import AttentionSamples, capture
from ..calibration.stats import LayerStats, StatsCollector
from ..compat import stamp_config
from ..errors import KVConvertError
from ..modeling import DECI_FILES
from ..modeling import export as remote
from ..recipe import Recipe
from ..source import Source
from ..target import Target
from ..writer import cast_float, copy_side_files, write_json
from . import budget as budget_mod
from . import grouping as grouping_mod
from . import refine as refine_mod
from .fold import AttentionWeights
from .layer import LayerResult, LayerShape, merge_layer, to_float64
from .project import ProjectedLayerResult, RotatedStatsCollector, project_layer


def check_kv_heads(src: Source, kv_heads: int) -> None:
    kv = src.num_kv_heads
    if kv_heads > kv or kv % kv_heads:
        divisors = [g for g in range(1, kv + 1) if kv % g == 0]
        raise KVConvertError(
            f"--kv-heads {kv_heads} must divide the model's {kv} KV heads "
            f"(choose one of {', '.join(map(str, divisors))})"
        )


def layer_counts(src: Source, recipe: Recipe) -> list[int]:
    """KV heads per layer from --kv-heads or --kv-heads-per-layer (--kv-budget: all, for now)."""
    if recipe.kv_heads_per_layer is not None:
        counts = budget_mod.parse_heads_per_layer(
            recipe.kv_heads_per_layer, src.num_layers, src.num_kv_heads
        )
    elif recipe.kv_budget is not None:
        budget_mod.budget_heads(recipe.kv_budget, src.num_layers, src.num_kv_heads)
        counts = [src.num_kv_heads] * src.num_layers
    else:
        check_kv_heads(src, recipe.kv_heads)
        counts = [recipe.kv_heads] * src.num_layers
    if needs_remote_code(recipe, counts) or recipe.kv_budget is not None:
        model_type = src.config.get("model_type")
        if model_type not in remote.SUPPORTED:
            raise KVConvertError(
                f"--rope-keys project and per-layer KV heads are not available for {model_type!r} "
                f"yet (supported: {', '.join(remote.SUPPORTED)})"
            )
    return counts


#: --refine-steps where the run calibrates: on SmolLM2 (3 -> 1 KV heads) 40 steps at the
#: default lr take the layers' held-out output error from 0.60 to 0.24, 100 to 0.23.
REFINE_STEPS = 50


def needs_remote_code(recipe: Recipe, counts: list[int]) -> bool:
    """Per-layer head counts or projected keys: no stock class can load the result."""
    return recipe.rope_keys == "project" or len(set(counts)) > 1


def layer_shape(src: Source) -> LayerShape:
    rope = src.adapter.rope_pairs(src.config)
    return LayerShape(src.num_heads, src.num_kv_heads, src.head_dim, rope)


def layer_weights(
    src: Source, layer: int, read: Mapping[str, torch.Tensor] | None = None
) -> AttentionWeights:
    """Layer ``layer``'s attention tensors as the solver takes them (q/k/v/o cut apart)."""
    return AttentionWeights.from_items(src.attention_items(layer, read))


def layer_tensors(res: LayerResult) -> dict[str, torch.Tensor | None]:
    """Module-relative names (q_proj.weight, ..., key_down) of a solved layer's tensors."""
    out = {f"{k[0]}_proj.{k[2:]}": v for k, v in res.weights.items().items()}
    if isinstance(res, ProjectedLayerResult):
        out.update(res.extra_tensors())
    return out


class GQATarget(Target):
    name = "gqa"
    no_data = "none (data-free method)"

    def __init__(self, src: Source, recipe: Recipe):
        super().__init__(src, recipe)
        self.counts = layer_counts(src, recipe)
        if recipe.format == "deci" and (unfit := self.deci_unfit()):
            raise KVConvertError(f"--format deci: {unfit}")
        self.shape = layer_shape(src)
        model_type = src.config.get("model_type")
        if recipe.refine_steps and model_type not in remote.SUPPORTED:
            raise KVConvertError(
                f"--refine-steps is not available for {model_type!r} yet (supported: "
                f"{', '.join(remote.SUPPORTED)}); use --refine-steps 0"
            )
        self.stats: dict[int, LayerStats] | None = None
        self.allocation: budget_mod.Allocation | None = None
        self.results: dict[int, LayerResult] = {}
        self.refined: dict[int, refine_mod.Refined] = {}

    def needs_data(self) -> bool:
        r = self.recipe
        return r.method == "svd" or r.kv_budget is not None or self.refine_steps() > 0

    def refine_steps(self) -> int:
        """--refine-steps, or its default: REFINE_STEPS where the run calibrates anyway and
        the model's attention can be rebuilt in-process (remote.SUPPORTED), else 0."""
        r = self.recipe
        if r.refine_steps is not None:
            return r.refine_steps
        calibrates = r.method == "svd" or r.kv_budget is not None
        supported = self.src.config.get("model_type") in remote.SUPPORTED
        return REFINE_STEPS if calibrates and supported else 0

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

    # --- refining (whole-model engine) -----------------------------------------------------
    @torch.no_grad()
    def refine_layers(
        self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, progress: bool
    ) -> None:
        """Refine every merged layer (refine.py) on the original model's activations.

        The calibration batches are pushed through the decoder layers one layer at a time
        (each layer gets the keyword arguments the model's own forward gave it: masks differ
        between sliding and full layers), so memory holds one layer's activations, not all.
        """
        src, batch_size = self.src, self.recipe.batch_size
        todo = [i for i in range(src.num_layers) if self.refines(i)]
        paths = [src.attention_path(i).rsplit(".", 1)[0] for i in range(todo[-1] + 1)]
        layers = [model.get_submodule(p) for p in paths]  # the decoder layers up to the last
        hidden: list[torch.Tensor] = []
        kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]

        def grab(i: int):
            def hook(_mod: torch.nn.Module, args: tuple, kw: dict) -> None:
                x = args[0] if args else kw["hidden_states"]
                if i == 0:
                    hidden.append(x)
                kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
                if i == len(layers) - 1:
                    raise _Enough

            return hook

        pre = [m.register_forward_pre_hook(grab(i), with_kwargs=True) for i, m in enumerate(layers)]
        try:
            for batch in batches(tokens, batch_size):
                with contextlib.suppress(_Enough):
                    model(input_ids=batch.to(device), use_cache=False)
        finally:
            for h in pre:
                h.remove()
        dtype = next(model.parameters()).dtype
        bar = tqdm(total=len(todo), desc="refining layers", unit="layer", disable=not progress)
        for i, layer in enumerate(layers):
            attn = model.get_submodule(src.attention_path(i))
            with capture(attn) as samples:
                outs = [_hidden(layer(h, **kw)) for h, kw in zip(hidden, kwargs[i], strict=True)]
            if i in todo:
                res = self.solve(i, self.counts[i], device)
                with torch.enable_grad():
                    self.refined[i] = self.refine(i, res, samples, attn, device, dtype)
                bar.update(1)
            hidden = outs
        bar.close()

    def refine(
        self,
        layer: int,
        res: LayerResult,
        samples: AttentionSamples,
        original: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        world: int = 1,
    ) -> refine_mod.Refined:
        """Fit the solved layer's attention to ``samples`` (what ``original`` produced)."""
        impl = getattr(getattr(original, "config", None), "_attn_implementation", None)
        module = self.merged_module(layer, res, impl, device, dtype)
        lr = self.recipe.refine_lr or refine_mod.DEFAULT_LR
        rows = self.recipe.refine_rows
        return refine_mod.refine(module, samples, self.refine_steps(), lr, world, rows)

    @staticmethod
    def apply_refined(res: LayerResult, refined: refine_mod.Refined) -> None:
        """Put the refined tensors into ``res`` (float64, as the solve left them)."""
        items = res.weights.items()
        for key, t in refined.tensors.items():
            items[key] = t.to(device=items[key].device, dtype=items[key].dtype)
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

    def solve_layer(
        self,
        layer: int,
        stats: Any,
        device: torch.device,
        out_dtype: torch.dtype | None,
        read: Mapping[str, torch.Tensor],
        samples: AttentionSamples | None = None,
        original: torch.nn.Module | None = None,
        world: int = 1,
    ) -> tuple[dict[str, torch.Tensor], LayerResult]:
        """Solve one layer (layer-sequential engine); ``samples``: what the original attention
        ``original`` produced on the calibration activations, to refine the merge on."""
        w = layer_weights(self.src, layer, read)
        for key, t in w.items().items():
            if t is not None and t.is_floating_point() and not t.isfinite().all():
                raise KVConvertError(f"layer {layer}: source tensor {key} contains NaN/inf")
        res = self.solve(layer, self.counts[layer], device, w, stats)
        if samples is not None and self.refines(layer):
            dtype = next(original.parameters()).dtype
            refined = self.refine(layer, res, samples, original, device, dtype, world)
            self.apply_refined(res, refined)
        new = res.weights.items()
        check_finite(layer, new)
        orig = w.items()
        names = self.src.attention_tensor_names(layer)
        solved = {name: new[key].to(out_dtype or orig[key].dtype) for name, key in names.items()}
        return solved, res

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
            results[i] = res
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
        return remote.deci_unfit(self.src.config, self.biases(), projected)

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

    def finish(
        self,
        work: Path,
        shards: list[str],
        calibration: dict[str, Any],
        out_dtype: torch.dtype | None,
        command: str | None,
        t0: float,
        t_calib: float,
        results: Mapping[int, Any] | None = None,
    ) -> None:
        src, recipe, counts = self.src, self.recipe, self.counts
        results = self.results if results is None else results
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
        if out_dtype is not None:
            config["dtype"] = recipe.dtype
            config.pop("torch_dtype", None)
        write_json(work / "config.json", stamp_config(config))
        side = copy_side_files(src.folder, work)
        final_dtype = out_dtype or src.dtype
        rep = {
            **report_mod.report_header(recipe, src, command),
            "target": self.report(layout, note),
            "calibration": calibration,
            "layers": [
                {
                    "layer": i,
                    "groups": [list(g) for g in results[i].groups],
                    "key_error": results[i].key_error,
                    "value_error": results[i].value_error,
                    **_refine_entry(results[i]),
                }
                for i in sorted(results)
            ],
            "kv_bytes_per_token": {
                "before": report_mod.kv_bytes_per_token(
                    [src.num_kv_heads] * src.num_layers, src.head_dim, src.dtype
                ),
                "after": report_mod.kv_bytes_per_token(counts, src.head_dim, final_dtype),
                "dtype": str(final_dtype).removeprefix("torch."),
            },
            "files": {"weights": shards, "copied": side, "model_code": model_files},
            "timing_s": {
                "calibration": round(t_calib, 3),
                "total": round(time.perf_counter() - t0, 3),
            },
        }
        write_json(work / "kvconvert.json", rep)
        report_mod.write_recipe_and_card(work, recipe, rep, src.folder, config)


class _Enough(Exception):
    """Raised by a hook once the layers to refine have their inputs: ends the forward."""


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _refine_entry(result: Any) -> dict[str, Any]:
    err = getattr(result, "refine_error", None)
    return {} if err is None else {"refine_error": {"before": err[0], "after": err[1]}}


def check_finite(layer: int, new: Mapping[str, torch.Tensor | None]) -> None:
    bad = [k for k, v in new.items() if v is not None and not v.isfinite().all()]
    if bad:
        raise KVConvertError(f"layer {layer}: solved {', '.join(bad)} contain NaN/inf")
