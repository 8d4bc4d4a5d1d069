"""The teacher and the student of a heal: where they run, how they load, and what trains.

By default only the tensors the conversion changed train (for a PoD output, the attention of
the layers that borrow keys); everything else stays bit-exact and is shared with the teacher
so that it is held once (docs/heal.md).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..distributed import dist_setup, local_device
from ..errors import KVConvertError
from ..loading import load_model, resolve_device
from ..pod.options import borrowing_layers, proximal_window
from ..source import TensorSource, read_config
from .lora import LoRALinear, add_lora
from .options import HealOptions


@dataclass(frozen=True)
class Placement:
    """Where a run computes: the devices, the autocast dtype and this process's torchrun rank.
    Loading, the student's own text, the loop and the report all read it."""

    device: torch.device
    teacher_device: torch.device
    amp_dtype: torch.dtype | None  # None: plain float32
    rank: int
    world: int

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def place_run(opts: HealOptions) -> Placement:
    """The run's devices and rank; joins the torchrun group when there is one."""
    device = local_device(resolve_device(opts.device))
    rank, world = dist_setup(device)
    if world > 1 and opts.resume:
        raise KVConvertError(
            "--resume is not supported under torchrun; resume in one process with "
            "--grad-accum multiplied by the number of processes"
        )
    teacher_device = device if opts.teacher_device == "same" else torch.device("cpu")
    return Placement(device, teacher_device, autocast_dtype(opts.precision, device), rank, world)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device`` (None: plain float32)."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise KVConvertError(
                f"precision: {precision} autocast needs a CUDA device; use auto or fp32 here"
            )
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class Models:
    """The frozen teacher, the student, and the student's tensors that train."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    tensors: TensorSource  # the converted checkpoint, read lazily (exact stored values)
    changed: set[str]  # parameters the conversion changed
    scopes: set[str]  # modules whose parameters train
    trainable: dict[str, torch.nn.Parameter]  # name -> parameter, in optimiser order
    lora: dict[str, LoRALinear]  # module name -> adapter (--lora), else empty
    digest: str  # of the converted tensors that train, so --resume refuses another model


def load_models(opts: HealOptions, original: Path, converted: Path, place: Placement) -> Models:
    """Load teacher and student, and mark what trains (``opts`` gets its lengths resolved)."""
    tensors = TensorSource.open(converted)
    if any(f.suffix != ".safetensors" for f in tensors.files):
        raise KVConvertError(f"{converted} must hold .safetensors weights to be healed")
    load_dtype = place.amp_dtype or torch.float32
    student = load_model(  # kvconvert's own modeling code, or the user's consent
        converted,
        place.device,
        load_dtype,
        is_kvconvert_remote_code(converted) or opts.trust_remote_code,
    )
    teacher = load_model(
        original,
        place.teacher_device,
        load_dtype if place.teacher_device.type == "cuda" else torch.float32,
        opts.trust_remote_code,
    )
    teacher.requires_grad_(False)
    opts.resolve_lengths(student.config)
    check_distant_tokens(student.config, opts.seq_len)
    changed = changed_parameters(student, teacher, tensors)
    scopes = converted_modules(student, changed) | borrowing_attention(student)
    lora, trainable = select_trainable(student, tensors, scopes, opts)
    digest = initial_digest(tensors, lora, trainable)
    if opts.train != "all":
        share_frozen_with_teacher(student, teacher)
    enable_gradient_checkpointing(student, opts.gradient_checkpointing)
    return Models(student, teacher, tensors, changed, scopes, trainable, lora, digest)


def is_kvconvert_remote_code(folder: Path) -> bool:
    """True for a kvconvert output whose config names remote code (kvconvert's own modeling
    files, copied in by the conversion), which is safe to load without --trust-remote-code."""
    if not (folder / "kvconvert.json").is_file():
        return False
    return "auto_map" in read_config(folder)


def select_trainable(
    s: torch.nn.Module, tensors: TensorSource, scopes: set[str], opts: HealOptions
) -> tuple[dict[str, LoRALinear], dict[str, torch.nn.Parameter]]:
    """The adapters (under --lora, else none) and name -> parameter of what trains, in a fixed
    order (the optimiser state depends on it)."""
    s.requires_grad_(False)
    lora: dict[str, LoRALinear] = {}
    if opts.lora:
        linears = {
            name
            for name, mod in s.named_modules()
            if isinstance(mod, torch.nn.Linear) and in_scope(name + ".weight", scopes)
        }
        if not linears:
            raise KVConvertError("lora: the conversion changed no linear projection")
        lora = add_lora(s, sorted(linears), opts.lora, opts.seed)
        params = {}
        for name, mod in lora.items():
            params[f"{name}.lora_a"] = mod.lora_a
            params[f"{name}.lora_b"] = mod.lora_b
    else:
        params = {
            n: p for n, p in s.named_parameters() if opts.train == "all" or in_scope(n, scopes)
        }
        for name, p in params.items():  # exact float32 master copies from the checkpoint
            src = tensors.get(name) if name in tensors else p.data
            p.data = src.to(p.device, torch.float32)
    if not params:
        raise KVConvertError(
            f"{tensors.folder} does not differ from the original: nothing to heal "
            "(use --train all to fine-tune every parameter)"
        )
    for p in params.values():
        p.requires_grad_(True)
    return lora, {n: params[n] for n in sorted(params)}


def share_frozen_with_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Point the teacher's copies of unchanged, frozen tensors at the student's (held once)."""
    mine = dict(student.named_parameters())
    for name, q in teacher.named_parameters():
        p = mine.get(name)
        if (
            p is not None
            and not p.requires_grad
            and p.shape == q.shape
            and p.dtype == q.dtype
            and p.device == q.device
            and torch.equal(p, q)
        ):
            q.data = p.data


def initial_digest(
    tensors: TensorSource, lora: dict[str, LoRALinear], trainable: dict[str, torch.nn.Parameter]
) -> str:
    """A hash of the converted tensors that train, so --resume refuses another model."""
    h = hashlib.sha256()
    names = sorted(lora) if lora else list(trainable)
    for name in names:
        key = f"{name}.weight" if lora else name
        t = tensors.get(key) if key in tensors else trainable[key].detach()
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def enable_gradient_checkpointing(student: torch.nn.Module, wanted: bool) -> None:
    """``--gradient-checkpointing``, refused where the model cannot run it."""
    if wanted and getattr(student.config, "pod_map", None):
        # transformers' checkpointed layers run without the cache, and PoD attention
        # reads the block bottoms' keys there
        raise KVConvertError(
            "gradient_checkpointing: not supported for PoD outputs (the recomputed layers "
            "get no cache, and upper layers read the block bottom's keys from it)"
        )
    if wanted:
        try:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        except Exception as e:  # noqa: BLE001 - models without support say so
            raise KVConvertError(f"gradient_checkpointing: not supported here: {e}") from e


def changed_parameters(
    student: torch.nn.Module, teacher: torch.nn.Module, tensors: TensorSource
) -> set[str]:
    """Names of the student's parameters the conversion changed (new, reshaped or rewritten).

    Values are compared in the converted checkpoint's dtype, so a conversion that also cast
    the model (``--dtype``) does not mark every tensor as changed.
    """
    theirs = dict(teacher.named_parameters())
    out = set()
    for name, p in student.named_parameters():
        q = theirs.get(name)
        if q is None or q.shape != p.shape:
            out.add(name)
            continue
        dt = tensors.get(name).dtype if name in tensors else p.dtype
        if not torch.equal(q.detach().to(p.device, dt), p.detach().to(dt)):
            out.add(name)
    return out


def converted_modules(model: torch.nn.Module, changed: set[str]) -> set[str]:
    """The modules the conversion touched: for a changed projection (``nn.Linear``) its parent
    (the attention block, so a layer's q/k/v/o all train), else the module owning the tensor."""
    out = set()
    for name in changed:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        mod = model.get_submodule(owner)
        out.add(owner.rsplit(".", 1)[0] if isinstance(mod, torch.nn.Linear) else owner)
    return out


def check_distant_tokens(config: Any, seq_len: int) -> None:
    """A PoD model differs from the original only on distant tokens: training sequences no
    longer than sink + recent + 1 tokens would teach it nothing."""
    window = proximal_window(config)
    if window is None:
        return  # not PoD, or no layer borrows (nothing to heal, said later)
    sink, recent = window
    if seq_len <= sink + recent + 1:
        raise KVConvertError(
            f"seq_len: this PoD model keeps its own keys for the first {sink} and the last "
            f"{recent} tokens, so sequences of {seq_len} tokens have no distant token to learn "
            f"from; use --seq-len above {sink + recent + 1}"
        )


def borrowing_attention(model: torch.nn.Module) -> set[str]:
    """A PoD output keeps every weight: what must adapt is the attention of the layers that
    read another layer's keys, so those attention blocks train."""
    borrowing = borrowing_layers(model.config)
    if not borrowing:
        return set()
    return {
        name
        for name, mod in model.named_modules()
        if any(c.__name__ == "PodAttentionMixin" for c in type(mod).__mro__)
        and getattr(mod, "layer_idx", None) in borrowing
    }


def in_scope(name: str, scopes: set[str]) -> bool:
    """Whether parameter ``name`` lies in one of the modules ``scopes`` ("" is the model)."""
    return any(name.startswith(s + ".") or not s for s in scopes)
