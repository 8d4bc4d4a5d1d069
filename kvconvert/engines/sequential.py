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

import copy
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..calibration.data import calibration_info, calibration_tokens
from ..calibration.samples import capture
from ..calibration.stats import LayerStats, StatsCollector
from ..compat import cache_kwargs
from ..distributed import barrier, dist_setup
from ..errors import KeptProgress, KVConvertError
from ..eta import Estimate
from ..loading import compute_dtype, load_model, output_dtype, resolve_device
from ..recipe import Recipe, parse_size
from ..source import Source
from ..target import Target
from ..version import __version__
from ..writer import STATE_DIR, ShardedWriter, cast_float, resumable_output, work_folder

#: Options that do not change the result (left out of the resume fingerprint).
NOT_FINGERPRINTED = ("output", "overwrite", "resume", "dry_run", "offload_activations")


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
class DoneLayer:
    """What the report needs of a solved layer (also restored from a resume checkpoint)."""

    groups: list[tuple[int, ...]]
    key_error: float
    value_error: float
    refine_error: tuple[float, float] | None = None


def _pair(v: list[float] | None) -> tuple[float, float] | None:
    return None if v is None else (v[0], v[1])


# --- distributed -----------------------------------------------------------------------------
def all_reduce_sums(stats: LayerStats, world: int) -> None:
    """Sum one layer's second-moment sums (and token count) over the ranks, in place."""
    if world == 1:
        return
    import torch.distributed as dist

    for t in (stats.k, stats.v, stats.q):
        dist.all_reduce(t)
    n = torch.tensor([float(stats.count)], dtype=torch.float64, device=stats.k.device)
    dist.all_reduce(n)
    stats.count = int(n.item())


# --- building layers without building the model ---------------------------------------------
class LayerFactory:
    """Decoder layers of the source, one at a time, materialised from the checkpoint."""

    def __init__(self, src: Source, device: torch.device, dtype: torch.dtype, trust: bool):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.src, self.device, self.dtype = src, device, dtype
        self.adapter = src.adapter
        self.cfg = AutoConfig.from_pretrained(src.folder, trust_remote_code=trust)
        self._trust = trust
        self._auto = AutoModelForCausalLM
        self._skeletons: dict[int | None, torch.nn.Module] = {None: self._skeleton(self.cfg)}
        rot = self._skeletons[None].get_submodule(self.adapter.rotary_module)
        self.rotary = type(rot)(config=self.cfg).to(device)

    def _skeleton(self, cfg: Any) -> torch.nn.Module:
        with torch.device("meta"):
            return self._auto.from_config(cfg, dtype=self.dtype, trust_remote_code=self._trust)

    def _prefix(self, i: int) -> str:
        return self.adapter.layer_prefix.format(i=i)

    def layer(
        self,
        i: int,
        kv_heads: int | None = None,
        replace: dict[str, torch.Tensor] | None = None,
        on_read: Callable[[str, torch.Tensor], None] | None = None,
    ) -> torch.nn.Module:
        """Decoder layer ``i`` on the device (``kv_heads`` and ``replace``: a converted one).

        ``on_read(name, tensor)`` sees each source tensor as read, before the cast, so the
        caller can write the tensors the conversion keeps without reading them again.
        """
        if kv_heads not in self._skeletons:
            cfg = copy.deepcopy(self.cfg)
            cfg.num_key_value_heads = kv_heads
            self._skeletons[kv_heads] = self._skeleton(cfg)
        prefix = self._prefix(i)
        mod = copy.deepcopy(self._skeletons[kv_heads].get_submodule(prefix.rstrip(".")))
        state = {}
        for key, _ in [*mod.named_parameters(), *mod.named_buffers()]:
            name = prefix + key
            if replace and name in replace:
                t = replace[name]
            else:
                t = self.src.tensors.get(name)
                if on_read is not None:
                    on_read(name, t)
            dt = self.dtype if t.is_floating_point() else t.dtype
            state[key] = t.to(device=self.device, dtype=dt)
        mod.load_state_dict(state, assign=True, strict=True)
        return mod.eval()

    def holder(self, i: int, layer: torch.nn.Module) -> torch.nn.Module:
        """A module where ``layer`` sits at its checkpoint path, so StatsCollector finds it."""
        root = torch.nn.Module()
        node, parts = root, self._prefix(i).rstrip(".").split(".")
        for part in parts[:-1]:
            child = torch.nn.Module()
            node.add_module(part, child)
            node = child
        node.add_module(parts[-1], layer)
        return root

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows gathered in the stored dtype, then cast (same values, less memory)."""
        w = self.src.tensors.get(self.adapter.embed_tokens).to(self.device)
        return torch.nn.functional.embedding(tokens.to(self.device), w).to(self.dtype)

    def context(self, i: int, h: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of a decoder layer's forward: positions, RoPE and causal mask."""
        from transformers import masking_utils

        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        types = getattr(self.cfg, "layer_types", None)
        sliding = (
            types[i] == "sliding_attention"
            if types
            else getattr(self.cfg, "sliding_window", None) is not None
        )
        make = (
            masking_utils.create_sliding_window_causal_mask
            if sliding
            else masking_utils.create_causal_mask
        )
        mask = make(
            config=self.cfg,
            inputs_embeds=h,
            attention_mask=None,
            position_ids=pos,
            **cache_kwargs(None),
        )
        return {
            "attention_mask": mask,
            "position_ids": pos,
            "position_embeddings": self.rotary(h, pos),
        }


def run_layer(
    layer: torch.nn.Module, factory: LayerFactory, i: int, h: torch.Tensor
) -> torch.Tensor:
    out = layer(h, **factory.context(i, h))
    return out[0] if isinstance(out, tuple) else out


def release_memory() -> None:
    """Hand freed memory back to the OS between layers.

    glibc keeps freed blocks below its (self-raising, up to 32 MB) mmap threshold in the heap,
    so layer after layer of ~25 MB tensors would grow the RSS; a fixed threshold plus
    ``malloc_trim`` keeps the peak at one layer's worth. A no-op elsewhere.

    The survivors of the collection are frozen (moved out of the collector's view): they are
    long-lived (modules imported lazily during the first layer, configs, the source), and
    rescanning them at every layer cost ~0.15 s a layer. Frozen objects are still freed by
    reference counting; :func:`gc_frozen` unfreezes them after the loop.
    """
    gc.collect()
    gc.freeze()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def gc_frozen() -> Iterator[None]:
    """Collect, then keep the survivors frozen for the layer loop (see release_memory)."""
    release_memory()
    try:
        yield
    finally:
        gc.unfreeze()


_LIBC: list = []


def _libc() -> Any:
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                lib = ctypes.CDLL("libc.so.6")
                lib.mallopt(-3, 4 * 2**20)  # M_MMAP_THRESHOLD: tensors >= 4 MB get own mmap
            except (OSError, AttributeError):
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


# --- sizes, disk, plan -----------------------------------------------------------------------
def layer_names(src: Source, i: int) -> list[str]:
    prefix = src.adapter.layer_prefix.format(i=i)
    return [n for n in src.tensors.names() if n.startswith(prefix)]


def output_bytes(src: Source, recipe: Recipe, out_dtype: torch.dtype | None) -> int:
    """Bytes of the output's weights, from the source headers (nothing is read)."""
    kv_names = {
        src.adapter.tensor_name(i, p, kind)
        for i in range(src.num_layers)
        for p in ("k", "v")
        for kind in ("weight", "bias")
    }
    total = 0
    for name in src.tensors.names():
        numel, itemsize, floating = src.tensors.info(name)
        nbytes = numel * (out_dtype.itemsize if out_dtype is not None and floating else itemsize)
        if name in kv_names:
            nbytes = nbytes * recipe.kv_heads // src.num_kv_heads
        total += nbytes
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
    out_size = output_bytes(src, recipe, out_dtype)
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


# --- resume state ----------------------------------------------------------------------------
def fingerprint(src: Source, recipe: Recipe, tokens: torch.Tensor | None) -> str:
    """Hash of everything that decides the output: model files, calibration tokens, options."""
    opts = {k: v for k, v in recipe.to_dict().items() if k not in NOT_FINGERPRINTED}
    files = [(p.name, p.stat().st_size) for p in src.tensors.files]
    h = hashlib.sha256()
    h.update(json.dumps([opts, src.config, files, __version__], sort_keys=True).encode())
    h.update(json.dumps(src.tensors.names()).encode())
    if tokens is not None:
        h.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    state_dir: Path,
    layer: int,
    acts: list[torch.Tensor] | None,
    writer: ShardedWriter,
    results: dict[int, DoneLayer],
    fp: str,
) -> None:
    """Record that ``layer`` is complete: next inputs, writer position, results (atomic)."""
    name = None
    if acts is not None:
        name = f"acts-{layer}.safetensors"
        tmp = state_dir / (name + ".tmp")
        save_file({str(j): a.detach().to("cpu").contiguous() for j, a in enumerate(acts)}, tmp)
        os.replace(tmp, state_dir / name)
    state = {
        "fingerprint": fp,
        "next_layer": layer + 1,
        "acts": name,
        "writer": writer.state(),
        "results": {
            str(i): [[list(g) for g in r.groups], r.key_error, r.value_error, r.refine_error]
            for i, r in results.items()
        },
    }
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_dir / "state.json")
    old = state_dir / f"acts-{layer - 1}.safetensors"
    if old.exists():
        old.unlink()


def verify_fingerprint(state: dict, fp: str, work: Path) -> None:
    if state["fingerprint"] != fp:
        raise KVConvertError(
            f"--resume: {work} was started with a different model, calibration data or options "
            "(fingerprint mismatch); rerun with the same options, or without --resume to start "
            "over"
        )


def load_checkpoint(state_dir: Path, fp: str, writer: ShardedWriter, work: Path) -> dict:
    path = state_dir / "state.json"
    if not path.is_file():
        return {"next_layer": 0, "acts": None, "results": {}}
    state = json.loads(path.read_text())
    verify_fingerprint(state, fp, work)
    writer.restore(state["writer"])
    state["results"] = {
        int(i): DoneLayer([tuple(g) for g in r[0]], r[1], r[2], _pair(r[3]))
        for i, r in state["results"].items()
    }
    return state


# --- the run ---------------------------------------------------------------------------------
def _tokens(
    recipe: Recipe, src: Source, device: torch.device, state_dir: Path | None, progress: bool
):
    """Calibration tokens; sampled ones are kept in the work folder so --resume reuses them."""
    saved = state_dir / "tokens.safetensors" if state_dir is not None else None
    if recipe.calibration == "self":
        if recipe.resume and saved is not None and saved.is_file():
            return load_file(saved)["tokens"]
        # Sampling needs the whole model (once, then freed): see docs/scale.md.
        compute = compute_dtype(device, src.dtype)
        model = load_model(src.folder, device, compute, recipe.trust_remote_code)
        tokens = calibration_tokens(recipe, model, src, progress).cpu()
        del model
        gc.collect()
        return tokens
    return calibration_tokens(recipe, None, src, progress)


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
        check_disk(output, output_bytes(src, recipe, out_dtype) + 2 * act_bytes - already)
    tokens = _tokens(recipe, src, device, state_dir, progress and rank == 0) if need_data else None
    fp = fingerprint(src, recipe, tokens)
    calib_info = {"source": target.no_data, "sequences": 0, "seq_len": 0}
    if tokens is not None:
        calib_info = calibration_info(recipe, tokens)
    if rank != 0:
        with gc_frozen():
            _layers(
                target, recipe, src, device, out_dtype, tokens, None, None, fp, {}, progress=False
            )
        barrier(world)
        return output
    # A work folder without state (stopped before its first layer completed, or while
    # finishing) is started over; one with state must match this run's fingerprint.
    resume = recipe.resume and (state_dir / "state.json").is_file()
    if resume:  # checked before the folder is in use, so a mismatch keeps the progress
        verify_fingerprint(json.loads((state_dir / "state.json").read_text()), fp, work)
    with resumable_output(output, recipe.overwrite, resume) as work:
        state_dir.mkdir(exist_ok=True)
        if tokens is not None and recipe.calibration == "self" and not resume:
            save_file({"tokens": tokens.contiguous()}, state_dir / "tokens.safetensors")
        writer = ShardedWriter(work, parse_size(recipe.max_shard_size))
        try:
            results: dict[int, DoneLayer] = {}
            state = load_checkpoint(state_dir, fp, writer, work) if resume else None
            with gc_frozen():
                _layers(
                    target,
                    recipe,
                    src,
                    device,
                    out_dtype,
                    tokens,
                    writer,
                    state,
                    fp,
                    results,
                    progress,
                )
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
        target.finish(work, shards, calib_info, out_dtype, command, t0, t_calib, results)
    barrier(world)
    return output


def _layer_prefixes(src: Source) -> list[str]:
    return [src.adapter.layer_prefix.format(i=i) for i in range(src.num_layers)]


class _LayerReads:
    """Routes each source tensor of a layer as its forward pass reads it, so the checkpoint is
    read once: the attention tensors the conversion changes are kept (as stored) for the
    solve, the others go to the output at once."""

    def __init__(
        self, writer: ShardedWriter | None, changed: dict[str, str], out_dtype: torch.dtype | None
    ):
        self.writer, self.changed, self.out_dtype = writer, changed, out_dtype
        self.kept: dict[str, torch.Tensor] = {}
        self.written: set[str] = set()

    def __call__(self, name: str, t: torch.Tensor) -> None:
        if name in self.changed:
            self.kept[name] = t
        elif self.writer is not None:
            self.writer.add(name, cast_float(t, self.out_dtype))
            self.written.add(name)


def _layers(
    target: Target,
    recipe: Recipe,
    src: Source,
    device: torch.device,
    out_dtype: torch.dtype | None,
    tokens: torch.Tensor | None,
    writer: ShardedWriter | None,
    state: dict | None,
    fp: str,
    results: dict[int, DoneLayer],
    progress: bool,
) -> None:
    """The layer loop. ``writer`` None: a non-zero rank, which only calibrates."""
    rank, world = dist_setup(device)
    compute = compute_dtype(device, src.dtype)
    store = torch.device("cpu") if recipe.offload_activations else device
    factory = (
        LayerFactory(src, device, compute, recipe.trust_remote_code) if tokens is not None else None
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
    if tokens is not None and acts is None and start == 0:
        mine = list(range(0, tokens.shape[0], recipe.batch_size))[rank::world]
        acts = [factory.embed(tokens[b : b + recipe.batch_size]).to(store) for b in mine]
    bar = tqdm(
        total=src.num_layers,
        initial=start,
        desc="converting layers",
        unit="layer",
        disable=not progress,
    )
    # one line with the whole run's time once two layers are done (refinement included)
    eta = Estimate("converting layers", src.num_layers - start, "layers", after=2,
                   enabled=progress and tokens is not None)  # fmt: skip
    for i in range(start, src.num_layers):
        stats = None
        nxt: list[torch.Tensor] | None = None
        attention = src.attention_tensor_names(i)
        reads = _LayerReads(writer, attention, out_dtype)
        samples, original = None, None
        if acts is not None:
            layer = factory.layer(i, on_read=reads)
            root = factory.holder(i, layer)
            refining = target.refines(i)
            original = root.get_submodule(src.attention_path(i)) if refining else None
            with (
                StatsCollector(root, src.adapter, src.config, [i]) as col,
                capture(original, store) if refining else nullcontext() as samples,
            ):
                outs = [run_layer(layer, factory, i, a.to(device)).to(store) for a in acts]
            del layer, root
            all_reduce_sums(col.stats[i], world)
            st = col.stats[i]
            if not all(t.isfinite().all() for t in (st.k, st.v, st.q)):
                raise KVConvertError(
                    f"layer {i}: calibration activations contain NaN/inf (check the source "
                    f"weights of layer {i} and below, or the compute dtype)"
                )
            if not all(o.isfinite().all() for o in outs):
                raise KVConvertError(
                    f"layer {i}: its outputs contain NaN/inf (check the source weights of layer "
                    f"{i}, or the compute dtype)"
                )
            stats = col.result()[i]
            nxt = outs if recipe.propagate == "original" else None
            del outs, col  # the collector holds the layer: drop both before solving
        solved, res = target.solve_layer(
            i, stats, device, out_dtype, reads.kept, samples, original, world
        )
        del samples, original
        reads.kept.clear()  # the solve read them; they are freed with it
        if acts is not None and nxt is None:  # --propagate converted
            conv = factory.layer(i, recipe.kv_heads, solved)
            nxt = [run_layer(conv, factory, i, a.to(device)).to(store) for a in acts]
            del conv
        acts = nxt
        results[i] = DoneLayer(list(res.groups), res.key_error, res.value_error, res.refine_error)
        if writer is not None:
            for name in layer_names(src, i):
                if name in solved:
                    writer.add(name, solved[name])
                elif name not in reads.written:
                    writer.add(name, cast_float(src.tensors.get(name), out_dtype))
            last = i == src.num_layers - 1
            save_checkpoint(state_dir, i, None if last else acts, writer, results, fp)
        del solved, res
        release_memory()
        bar.update(1)
        eta.update(1)
    bar.close()
