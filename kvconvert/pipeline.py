"""The conversion pipeline: source -> calibrate -> solve -> write.

``convert(recipe)`` is the whole run; each stage is a function below so that the stages can be
read (and replaced) one at a time.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import report as report_mod
from .arch import AttentionAdapter, get_adapter
from .calibration.data import batches, load_documents, sample_from_model, tokenize_documents
from .calibration.stats import LayerStats, StatsCollector
from .compat import stamp_config
from .errors import KVConvertError
from .gqa import budget as budget_mod
from .gqa.fold import AttentionWeights
from .gqa.layer import LayerResult, LayerShape, merge_layer, to_float64
from .gqa.project import ProjectedLayerResult, RotatedStatsCollector, project_layer
from .modeling import export as remote
from .recipe import Recipe, parse_size
from .source import TensorSource, read_config, resolve_source
from .writer import (
    ShardedWriter,
    atomic_output,
    cast_float,
    check_output,
    copy_side_files,
    write_json,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KVConvertError("device: --device cuda given but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, fallback: torch.dtype) -> torch.dtype:
    return fallback if name == "auto" else getattr(torch, name)


# --- stage 1: source ------------------------------------------------------------------------
class Source:
    """A resolved model: its folder, raw config, adapter and lazy weights."""

    def __init__(self, recipe: Recipe, progress: bool):
        self.folder = resolve_source(
            recipe.model, recipe.revision, recipe.trust_remote_code, progress
        )
        self.config = read_config(self.folder)
        self.adapter: AttentionAdapter = get_adapter(self.config.get("model_type"))
        self.tensors = TensorSource.open(self.folder)
        c, a = self.config, self.adapter
        self.num_layers, self.num_heads = a.num_layers(c), a.num_heads(c)
        self.num_kv_heads, self.head_dim = a.num_kv_heads(c), a.head_dim(c)
        self.shape = LayerShape(self.num_heads, self.num_kv_heads, self.head_dim, a.rope_pairs(c))
        #: the adapter with tensor names as this checkpoint stores them (module names for
        #: hooks stay ``adapter``'s): some are saved from the bare base model, e.g. ``h.0.``
        self.stored = a.for_checkpoint(self.tensors)
        self.dtype = self.tensors.get(self.stored.tensor_name(0, "k")).dtype

    def layer_weights(
        self, layer: int, read: Mapping[str, torch.Tensor] | None = None
    ) -> AttentionWeights:
        """Layer ``layer``'s attention tensors, cut into q/k/v/o by the adapter (fused qkv);
        ``read``: tensors already in memory, by checkpoint name (not read again)."""
        a, t, read = self.stored, self.tensors, read or {}
        stored = {
            role: read[n] if n in read else t.get_optional(n)
            for role, n in a.layer_tensor_names(layer).items()
        }
        return AttentionWeights.from_items(a.split(stored, self.num_heads, self.head_dim))

    def attention_tensor_names(self, layer: int) -> dict[str, str]:
        """checkpoint name -> stored role (``adapter.join`` of the solved items), for tensors
        present."""
        names = self.stored.layer_tensor_names(layer)
        return {n: role for role, n in names.items() if n in self.tensors}


def check_target(src: Source, target: str) -> None:
    """Refuse a target the architecture has no output for (its adapter's ``outputs``)."""
    outputs = src.adapter.outputs
    if target not in outputs:
        have = ", ".join(outputs) if outputs else "none yet"
        raise KVConvertError(
            f"model_type {src.config.get('model_type')!r}: --target {target} is not available "
            f"for this architecture (available: {have}); see docs/architectures.md"
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


def target_report(
    src: Source,
    recipe: Recipe,
    counts: list[int],
    use_remote: bool,
    allocation: budget_mod.Allocation | None,
) -> dict[str, Any]:
    """kvconvert.json "target": per-layer counts, key projection, and the budget's evidence."""
    out: dict[str, Any] = {
        "kind": "gqa",
        "num_key_value_heads": counts[0] if len(set(counts)) == 1 else counts,
        "remote_code": use_remote,
    }
    if recipe.rope_keys == "project":
        out["key_projection_heads"] = [src.num_kv_heads] * src.num_layers
    if allocation is not None:
        out["budget"] = {"fraction": recipe.kv_budget, **allocation.to_dict()}
    return out


def check_kv_heads(src: Source, kv_heads: int) -> None:
    kv = src.num_kv_heads
    if kv_heads > kv or kv % kv_heads:
        divisors = [g for g in range(1, kv + 1) if kv % g == 0]
        raise KVConvertError(
            f"--kv-heads {kv_heads} must divide the model's {kv} KV heads "
            f"(choose one of {', '.join(map(str, divisors))})"
        )


# --- stage 2: calibrate ---------------------------------------------------------------------
def load_model(folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    """The source model for calibration: one copy, on ``device``, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            device_map=str(device) if device.type != "cpu" else None,
        )
    except Exception as e:  # noqa: BLE001 - surface loader failures as one clear line
        raise KVConvertError(f"cannot load the model from {folder}: {e}") from e
    return model.to(device).eval()


def bos_token_id(folder: Path, config: dict[str, Any], tokenizer: Any | None) -> int:
    for cand in (config.get("bos_token_id"), _gen_config(folder).get("bos_token_id")):
        if isinstance(cand, int):
            return cand
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    raise KVConvertError(
        "--calibration self needs a BOS token id and this model declares none; give "
        "calibration data instead (a .txt or .jsonl file)"
    )


def _gen_config(folder: Path) -> dict[str, Any]:
    p = folder / "generation_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def load_tokenizer(folder: Path, trust_remote_code: bool) -> Any | None:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - token-id-only models have no tokenizer
        return None


def calibration_tokens(
    recipe: Recipe, model: torch.nn.Module, src: Source, progress: bool
) -> torch.Tensor:
    """Token ids (num_samples x seq_len) from the recipe's calibration source."""
    if recipe.calibration == "self":
        bos = bos_token_id(src.folder, src.config, None)
        with tqdm(
            total=recipe.num_samples, desc="sampling calibration", unit="seq", disable=not progress
        ) as bar:
            return sample_from_model(
                model, bos, recipe.num_samples, recipe.seq_len, recipe.batch_size, recipe.seed, bar
            )
    docs = load_documents(recipe.calibration, recipe.text_field)
    needs_tok = any(isinstance(d, str) for d in docs)
    tok = load_tokenizer(src.folder, recipe.trust_remote_code) if needs_tok else None
    return tokenize_documents(docs, tok, recipe.num_samples, recipe.seq_len, recipe.seed)


@torch.inference_mode()
def collect_stats(
    model: torch.nn.Module,
    src: Source,
    tokens: torch.Tensor,
    batch_size: int,
    progress: bool,
    rotated: bool = False,
) -> dict[int, LayerStats]:
    """Per-layer second moments; ``rotated``: keys and queries after RoPE (--rope-keys project)."""
    device = next(model.parameters()).device
    collector = RotatedStatsCollector if rotated else StatsCollector
    with collector(model, src.adapter, src.config) as col:
        n = (tokens.shape[0] + batch_size - 1) // batch_size
        for batch in tqdm(
            batches(tokens, batch_size), total=n, desc="calibrating", disable=not progress
        ):
            model(input_ids=batch.to(device), use_cache=False)
    return col.result()


# --- per-layer head counts -------------------------------------------------------------------
def solve_layer(
    src: Source,
    recipe: Recipe,
    stats: dict[int, LayerStats] | None,
    device: torch.device,
    layer: int,
    kv_heads: int,
) -> LayerResult:
    """Merge one layer to ``kv_heads`` KV heads with the recipe's method (float64 result)."""
    w = to_float64(src.layer_weights(layer), device)
    st = stats.get(layer) if stats else None
    if recipe.rope_keys == "project":
        return project_layer(
            w,
            st,
            src.shape,
            kv_heads,
            recipe.method,
            recipe.objective,
            recipe.grouping,
            recipe.seed,
        )
    return merge_layer(
        w,
        st,
        src.shape,
        kv_heads,
        recipe.method,
        recipe.rope_keys,
        recipe.objective,
        recipe.grouping,
        recipe.seed,
    )


def layer_tensors(res: LayerResult) -> dict[str, torch.Tensor | None]:
    """Module-relative names (q_proj.weight, ..., key_down) of a solved layer's tensors."""
    out = {f"{k[0]}_proj.{k[2:]}": v for k, v in res.weights.items().items()}
    if isinstance(res, ProjectedLayerResult):
        out.update(res.extra_tensors())
    return out


def attention_path(src: Source, layer: int) -> str:
    """Name of layer's attention module, e.g. model.layers.3.self_attn."""
    return src.adapter.module_name(layer, "q").rsplit(".", 1)[0]


def remote_config(src: Source, recipe: Recipe, counts: list[int]) -> dict[str, Any]:
    proj = [src.num_kv_heads if recipe.rope_keys == "project" else 0] * src.num_layers
    biases = {p: src.stored.tensor_name(0, p, "bias") in src.tensors for p in "qkvo"}
    return remote.remote_config(src.config, counts, proj, biases)


def needs_remote_code(recipe: Recipe, counts: list[int]) -> bool:
    """Per-layer head counts or projected keys: no stock class can load the result."""
    return recipe.rope_keys == "project" or len(set(counts)) > 1


def allocate_budget(
    model: torch.nn.Module,
    src: Source,
    recipe: Recipe,
    stats: dict[int, LayerStats] | None,
    tokens: torch.Tensor,
    device: torch.device,
    progress: bool,
) -> budget_mod.Allocation:
    """--kv-budget: measure each layer's sensitivity on calibration data, then solve."""
    kv = src.num_kv_heads
    base = remote_config(src, recipe, [kv] * src.num_layers)
    impl = model.config._attn_implementation
    dtype = next(model.parameters()).dtype

    def swap(i: int, c: int):
        cfg = dict(base, num_key_value_heads=[kv] * src.num_layers)
        cfg["num_key_value_heads"][i] = c
        res = solve_layer(src, recipe, stats, device, i, c)
        tensors = {k: v for k, v in layer_tensors(res).items() if v is not None}
        attn = remote.attention_module(cfg, i, tensors, impl).to(device=device, dtype=dtype)
        parent_name, attr = attention_path(src, i).rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        setattr(parent, attr, attn)
        return lambda: setattr(parent, attr, old)

    sens = budget_mod.measure_sensitivities(
        model,
        tokens[: recipe.budget_samples],
        src.num_layers,
        budget_mod.divisors(kv),
        swap,
        recipe.batch_size,
        progress,
    )
    return budget_mod.allocate(sens, kv, recipe.kv_budget)


# --- stage 3 + 4: solve and write -----------------------------------------------------------
def solved_tensors(
    src: Source,
    recipe: Recipe,
    stats: dict[int, LayerStats] | None,
    device: torch.device,
    out_dtype: torch.dtype | None,
    results: dict[int, LayerResult],
    progress: bool,
    counts: list[int],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every output tensor in checkpoint order: attention layers solved lazily, one at a time.

    A layer is solved when its first attention tensor is reached, and all of its attention
    tensors are written then, named as the output's layout has them (``output_adapter``: the
    source's, or e.g. GPT-NeoX's fused qkv as separate projections); memory holds one layer's
    solution, not the model's.
    """
    owner = {name: i for i in range(src.num_layers) for name in src.attention_tensor_names(i)}
    out_adapter = src.stored.output_adapter()
    renames = src.adapter.load_renames if src.adapter.remote_family else {}  # remote code
    bar = tqdm(total=src.num_layers, desc="solving layers", unit="layer", disable=not progress)
    for name in src.tensors.names():
        if name not in owner:
            t = src.tensors.get(name)
            yield (
                renames.get(name, name),
                cast_float(t, out_dtype),
            )
            continue
        i = owner[name]
        if i in results:  # written with the layer's first attention tensor
            continue
        orig = src.layer_weights(i).items()
        res = solve_layer(src, recipe, stats, device, i, counts[i])
        new = res.weights.items()
        bad = [k for k, v in new.items() if v is not None and not v.isfinite().all()]
        if bad:
            raise KVConvertError(f"layer {i}: solved {', '.join(bad)} contain NaN/inf")
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
                yield f"{attention_path(src, i)}.{extra}", t.to(out_dtype or src.dtype)
    bar.close()


def convert(recipe: Recipe, progress: bool = True, command: str | None = None) -> Path:
    """Run a whole conversion; return the output folder."""
    recipe.validate()
    if recipe.heal_steps:
        from .heal import convert_and_heal

        return convert_and_heal(recipe, progress, command)
    t0 = time.perf_counter()
    output = Path(recipe.output).expanduser()
    check_output(output, recipe.overwrite)
    if not progress:
        quiet_libraries()
    src = Source(recipe, progress)
    try:
        return _convert(recipe, src, output, progress, command, t0)
    finally:
        src.tensors.close()


def quiet_libraries() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _single_process(what: str, world: int) -> None:
    """Only the layer-sequential engine splits work across torchrun ranks; anything else run
    under torchrun would compute the same output on every rank and write it N times."""
    if world > 1:
        raise KVConvertError(
            f"torchrun: {what} runs in one process only (the layer-sequential engine, uniform "
            "--kv-heads GQA on the Llama layout, is the distributed one); run without torchrun"
        )


def _convert(
    recipe: Recipe, src: Source, output: Path, progress: bool, command: str | None, t0: float
) -> Path:
    check_target(src, recipe.target)
    from . import sequential
    from .distributed import world_size

    if recipe.target in ("pod", "gqa,pod"):
        _single_process("--target " + recipe.target, world_size())
        from .pod.convert import convert_pod

        return convert_pod(recipe, src, output, progress, command, t0)
    counts = layer_counts(src, recipe)
    device = resolve_device(recipe.device)
    out_dtype = None if recipe.dtype == "auto" else getattr(torch, recipe.dtype)
    torch.manual_seed(recipe.seed)
    # layer-sequential engine (bounded memory, resume, dry run, torchrun) where it applies
    if sequential.applies(recipe, src, counts):
        return sequential.convert(recipe, src, output, device, out_dtype, progress, command, t0)
    why = sequential.unsupported(recipe, src, counts) or "--pipeline whole"
    _single_process(f"a conversion with {why}", world_size())

    stats, calib_info = None, {"source": "none (data-free method)", "sequences": 0, "seq_len": 0}
    allocation = None
    if recipe.method == "svd" or recipe.kv_budget is not None:
        compute_dtype = torch.float32 if device.type == "cpu" else src.dtype
        model = load_model(src.folder, device, compute_dtype, recipe.trust_remote_code)
        tokens = calibration_tokens(recipe, model, src, progress)
        if recipe.method == "svd":
            rotated = recipe.rope_keys == "project"
            stats = collect_stats(model, src, tokens, recipe.batch_size, progress, rotated)
        if recipe.kv_budget is not None:
            allocation = allocate_budget(model, src, recipe, stats, tokens, device, progress)
            counts = allocation.counts
        calib_info = {
            "source": recipe.calibration,
            "sequences": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "seed": recipe.seed,
        }
        del model
    t_calib = time.perf_counter() - t0

    results: dict[int, LayerResult] = {}
    with atomic_output(output, recipe.overwrite) as work:
        writer = ShardedWriter(work, parse_size(recipe.max_shard_size))
        for name, tensor in solved_tensors(
            src, recipe, stats, device, out_dtype, results, progress, counts
        ):
            writer.add(name, tensor)
        shards = writer.finish()
        finish_output(
            work,
            recipe,
            src,
            results,
            calib_info,
            shards,
            out_dtype,
            command,
            t0,
            t_calib,
            counts,
            allocation,
        )
    return output


def finish_output(
    work: Path,
    recipe: Recipe,
    src: Source,
    results: dict[int, Any],
    calib_info: dict[str, Any],
    shards: list[str],
    out_dtype: torch.dtype | None,
    command: str | None,
    t0: float,
    t_calib: float,
    counts: list[int] | None = None,
    allocation: budget_mod.Allocation | None = None,
) -> None:
    """Everything but the weights: config, side files, kvconvert.json report, model card."""
    counts = counts or [recipe.kv_heads] * src.num_layers
    family = src.adapter.remote_family  # the architecture's GQA needs kvconvert's model code
    use_remote = family is not None or needs_remote_code(recipe, counts)
    if family is not None:
        config = remote.family_config(src.config, family, counts[0])
        model_files = remote.copy_model_files(work, family.files)
    elif use_remote:
        config = remote_config(src, recipe, counts)
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
        **report_header(recipe, src, command),
        "target": target_report(src, recipe, counts, use_remote, allocation),
        "calibration": calib_info,
        "layers": [
            {
                "layer": i,
                "groups": [list(g) for g in results[i].groups],
                "key_error": results[i].key_error,
                "value_error": results[i].value_error,
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
    write_recipe_and_card(work, recipe, rep, src.folder, config)


def report_header(
    recipe: Recipe, src: Source, command: str | None, num_kv_heads: int | None = None
) -> dict[str, Any]:
    """The first keys of every kvconvert.json: command, recipe, versions, source facts."""
    return {
        "kvconvert_report": 1,
        "command": command or "kvconvert.convert(...)",
        "recipe": recipe.to_dict(),
        "versions": report_mod.versions(),
        "source": {
            "model": recipe.model,
            "revision": recipe.revision,
            "model_type": src.config.get("model_type"),
            "num_key_value_heads": num_kv_heads or src.num_kv_heads,
            "num_attention_heads": src.num_heads,
            "head_dim": src.head_dim,
            "num_layers": src.num_layers,
        },
    }


def write_recipe_and_card(
    work: Path, recipe: Recipe, report: dict[str, Any], source: Path, config: dict[str, Any]
) -> None:
    """``recipe.yaml`` (the effective recipe, re-runnable with --recipe) and ``README.md``."""
    from .recipe import recipe_to_yaml

    pinned = recipe
    if (
        not report_mod.local_source(recipe)
        and recipe.revision is None
        and source.parent.name == "snapshots"
    ):
        pinned = replace(recipe, revision=source.name)  # the exact Hub commit converted
    header = (
        f"kvconvert recipe: {report['command']}\n"
        "Re-run: kvconvert --recipe recipe.yaml -o OUT   (flags given override these values)"
    )
    text = recipe_to_yaml(pinned, header=header)
    (work / "recipe.yaml").write_text(text)
    card = report_mod.model_card(
        report,
        report_mod.base_model_id(recipe, config),  # the source's keys, _name_or_path included
        source_card=report_mod.source_card_metadata(source),
        remote_code="auto_map" in config,
        recipe_yaml=text,
    )
    (work / "README.md").write_text(report_mod.without_local_paths(card, recipe))


def command_line() -> str:
    return shlex.join(["kvconvert", *sys.argv[1:]])
