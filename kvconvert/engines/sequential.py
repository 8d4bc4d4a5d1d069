"""Layer-sequential conversion: one decoder layer in memory at a time, resumable.

As llm-compressor's sequential onloading: the calibration tokens are embedded once; then, for
each decoder layer, only that layer's weights are read from the shards onto ``--device``, the
activations run through it with the statistics hooks on, its attention is solved, its tensors
are streamed to the output writer, the layer is freed and its outputs become the next layer's
inputs (``--propagate original``: the original layer's outputs, exactly what the whole-model
path computes; ``converted``: the converted layer's, so later layers calibrate on what they
will really see, at the cost of a second pass through each layer). The model is never built:
layers are created on the meta device from the config and materialised from the checkpoint.
Peak memory is about one layer in the compute dtype, plus the activations, plus one layer's
solve.

After every layer a checkpoint (activations, writer position, per-layer results and a
fingerprint of model, calibration and options) goes into ``OUTPUT.kvconvert-work``;
``--resume`` continues after the last completed layer. Under ``torchrun`` the calibration
batches are split across ranks, the statistics (sums) are all-reduced before each solve, and
rank 0 writes the output.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..calibration.data import calibration_info
from ..calibration.samples import capture
from ..calibration.stats import StatsCollector
from ..distributed import barrier, dist_setup
from ..errors import KeptProgress, KVConvertError
from ..eta import Estimate
from ..loading import compute_dtype, output_dtype, resolve_device
from ..options import parse_size
from ..recipe import Recipe
from ..source import Source
from ..target import LayerContext, RunInfo, Target
from ..writer import STATE_DIR, ShardedWriter, cast_float, resumable_output, work_folder
from .layers import (
    LayerFactory,
    LayerReads,
    all_reduce_sums,
    gc_frozen,
    release_memory,
    run_layer,
)
from .plan import check_disk, layer_names, output_bytes, plan
from .resume import (
    calibration_ids,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    verify_fingerprint,
)


def applies(target: Target, recipe: Recipe) -> bool:
    """Whether this run goes through the layer-sequential engine.

    ``auto`` takes it whenever the target can go layer by layer (uniform GQA on a
    Llama-layout model) and the whole-model engine otherwise; ``sequential`` insists and says
    why it cannot.
    """
    why = target.why_not_layer_by_layer()
    needs_seq = [f for f in ("resume", "dry_run") if getattr(recipe, f)]
    needs_seq += ["propagate converted"] if recipe.propagate != "original" else []
    if recipe.pipeline == "whole" or why:
        if recipe.pipeline == "sequential" or needs_seq:
            what = ", ".join(f"--{f.replace('_', '-')}" for f in needs_seq) or "--pipeline"
            raise KVConvertError(
                f"{what} needs the layer-sequential pipeline, which does not support "
                f"{why or '--pipeline whole'} yet"
            )
        return False
    return True


@dataclass
class LayerRun:
    """What every layer of one run shares: the target, options, source and calibration, and
    where the output goes (``writer`` None: a torchrun rank other than 0, which only
    calibrates)."""

    target: Target
    recipe: Recipe
    src: Source
    device: torch.device
    out_dtype: torch.dtype | None
    tokens: torch.Tensor | None
    fp: str
    writer: ShardedWriter | None = None
    progress: bool = False


@torch.inference_mode()
def run(
    target: Target,
    recipe: Recipe,
    src: Source,
    output: Path,
    progress: bool,
    command: str | None,
    t0: float,
) -> Path:
    """The whole conversion, layer by layer; returns the output folder."""
    device = resolve_device(recipe.device)
    out_dtype = output_dtype(recipe.dtype)
    torch.manual_seed(recipe.seed)
    if recipe.dry_run:
        print(plan(target, src, recipe, device, out_dtype))
        return output
    rank, world = dist_setup(device)
    if world > 1 and recipe.resume:
        raise KVConvertError("--resume is not supported under torchrun; resume in one process")
    need_data = target.needs_data()
    work = work_folder(output)
    state_dir = work / STATE_DIR
    if recipe.resume and not work.is_dir():
        raise KVConvertError(f"--resume: there is no interrupted run to resume ({work} is absent)")
    saved = state_dir / "state.json"
    if saved.is_file() and not recipe.resume and not recipe.overwrite:
        done = json.loads(saved.read_text()).get("next_layer", 0)
        raise KVConvertError(
            f"{work} holds an interrupted conversion ({done} of {src.num_layers} layers done); "
            "add --resume to continue it, or --overwrite to discard it and start over"
        )
    # the disk is checked before calibration (sampling can take long): at most
    # num_samples x seq_len tokens of activations, twice (current and next layer's)
    already = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) if recipe.resume else 0
    n_tokens = recipe.num_samples * recipe.seq_len if need_data else 0
    act_bytes = n_tokens * int(src.config.get("hidden_size", 0)) * 4
    if rank == 0:
        check_disk(output, output_bytes(target, src, out_dtype) + 2 * act_bytes - already)
    tokens = (
        calibration_ids(recipe, src, device, state_dir, progress and rank == 0)
        if need_data
        else None
    )
    job = LayerRun(target, recipe, src, device, out_dtype, tokens, fingerprint(src, recipe, tokens))
    calib_info = {"source": target.no_data, "sequences": 0, "seq_len": 0}
    if tokens is not None:
        calib_info = calibration_info(recipe, tokens)
    if rank != 0:
        with gc_frozen():
            _layers(job, None, {})
        barrier(world)
        return output
    # A work folder without state (stopped before its first layer completed, or while
    # finishing) is started over; one with state must match this run's fingerprint.
    resume = recipe.resume and (state_dir / "state.json").is_file()
    if resume:  # checked before the folder is in use, so a mismatch keeps the progress
        verify_fingerprint(json.loads((state_dir / "state.json").read_text()), job.fp, work)
    with resumable_output(output, recipe.overwrite, resume) as work:
        state_dir.mkdir(exist_ok=True)
        if tokens is not None and recipe.calibration == "self" and not resume:
            save_file({"tokens": tokens.contiguous()}, state_dir / "tokens.safetensors")
        writer = job.writer = ShardedWriter(work, parse_size(recipe.max_shard_size))
        job.progress = progress
        try:
            results: dict[int, dict[str, Any]] = {}
            state = load_checkpoint(state_dir, job.fp, writer, work) if resume else None
            with gc_frozen():
                _layers(job, state, results)
            for name in src.tensors.names():
                if not any(name.startswith(p) for p in _layer_prefixes(src)):
                    writer.add(name, cast_float(src.tensors.get(name), out_dtype))
            shards = writer.finish()
        except KeyboardInterrupt:
            writer.close()
            raise KeptProgress(
                f"interrupted; progress kept in {work}: run again with --resume to continue"
            ) from None
        finally:
            writer.close()
        shutil.rmtree(state_dir)
        t_calib = time.perf_counter() - t0
        target.finish(
            RunInfo(work, shards, calib_info, out_dtype, command, t0, t_calib, layers=results)
        )
    barrier(world)
    return output


def _layer_prefixes(src: Source) -> list[str]:
    return [src.adapter.layer_prefix.format(i=i) for i in range(src.num_layers)]


def _layers(job: LayerRun, state: dict | None, results: dict[int, dict[str, Any]]) -> None:
    """The layer loop: calibrate one layer, let the target solve it, write it, free it."""
    target, recipe, src, device, writer = job.target, job.recipe, job.src, job.device, job.writer
    rank, world = dist_setup(device)
    compute = compute_dtype(device, src.dtype)
    store = torch.device("cpu") if recipe.offload_activations else device
    factory = (
        LayerFactory(src, device, compute, recipe.trust_remote_code)
        if job.tokens is not None
        else None
    )
    state_dir = work_folder(Path(recipe.output).expanduser()) / STATE_DIR
    start = 0
    acts: list[torch.Tensor] | None = None
    if state is not None:
        start = state["next_layer"]
        results.update(state["results"])
        if state["acts"] is not None:
            saved = load_file(state_dir / state["acts"])
            acts = [saved[str(j)].to(store) for j in range(len(saved))]
    if job.tokens is not None and acts is None and start == 0:
        mine = list(range(0, job.tokens.shape[0], recipe.batch_size))[rank::world]
        acts = [factory.embed(job.tokens[b : b + recipe.batch_size]).to(store) for b in mine]
    bar = tqdm(
        total=src.num_layers,
        initial=start,
        desc="converting layers",
        unit="layer",
        disable=not job.progress,
    )
    # one line with the whole run's time once two layers are done (refinement included)
    eta = Estimate("converting layers", src.num_layers - start, "layers", after=2,
                   enabled=job.progress and job.tokens is not None)  # fmt: skip
    for i in range(start, src.num_layers):
        reads = LayerReads(writer, src.attention_tensor_names(i), job.out_dtype)
        ctx = LayerContext(i, device, job.out_dtype, reads.kept, world=world)
        nxt: list[torch.Tensor] | None = None
        samples = None
        if acts is not None:
            layer = factory.layer(i, on_read=reads)
            root = factory.holder(i, layer)
            sampled = target.wants_samples(i)
            ctx.original = root.get_submodule(src.attention_path(i)) if sampled else None
            with (
                StatsCollector(root, src.adapter, src.config, [i]) as col,
                capture(ctx.original, store, src.dtype) if sampled else nullcontext() as samples,
            ):
                outs = [run_layer(layer, factory, i, a.to(device), samples).to(store) for a in acts]
            ctx.samples = samples
            del layer, root
            all_reduce_sums(col.stats[i], world)
            _check_finite(i, col.stats[i], outs)
            ctx.stats = col.result()[i]
            if recipe.propagate == "original":  # the inputs are done with: free them first
                nxt, acts = outs, None
            del outs, col  # the collector holds the layer: drop both before solving
        solved = target.solve_layer(ctx)
        del ctx, samples
        reads.kept.clear()  # the solve read them; they are freed with it
        if acts is not None and nxt is None:  # --propagate converted
            conv = factory.layer(i, target.layer_overrides(i), solved.tensors)
            nxt = [run_layer(conv, factory, i, a.to(device)).to(store) for a in acts]
            del conv
        acts = nxt
        results[i] = solved.record
        if writer is not None:
            for name in layer_names(src, i):
                if name in solved.tensors:
                    writer.add(name, solved.tensors[name])
                elif name not in reads.written:
                    writer.add(name, cast_float(src.tensors.get(name), job.out_dtype))
            last = i == src.num_layers - 1
            save_checkpoint(state_dir, i, None if last else acts, writer, results, job.fp)
        del solved
        release_memory()
        bar.update(1)
        eta.update(1)
    bar.close()


def _check_finite(i: int, stats: Any, outs: list[torch.Tensor]) -> None:
    """Refuse NaN/inf in a layer's statistics or outputs, naming the layer."""
    if not all(t.isfinite().all() for t in (stats.k, stats.v, stats.q)):
        raise KVConvertError(
            f"layer {i}: calibration activations contain NaN/inf (check the source "
            f"weights of layer {i} and below, or the compute dtype)"
        )
    if not all(o.isfinite().all() for o in outs):
        raise KVConvertError(
            f"layer {i}: its outputs contain NaN/inf (check the source weights of layer "
            f"{i}, or the compute dtype)"
        )
