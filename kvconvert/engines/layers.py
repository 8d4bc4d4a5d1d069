"""The layer-sequential engine's pieces for one decoder layer: building it from the
checkpoint without building the model, running it, routing the tensors it reads, and handing
memory back between layers (docs/scale.md)."""

from __future__ import annotations

import copy
import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..calibration.samples import AttentionSamples
from ..calibration.stats import LayerStats
from ..compat import cache_kwargs
from ..source import Source
from ..writer import ShardedWriter, cast_float


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


class LayerFactory:
    """Decoder layers of the source, one at a time, materialised from the checkpoint."""

    def __init__(self, src: Source, device: torch.device, dtype: torch.dtype, trust: bool):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.src, self.device, self.dtype = src, device, dtype
        self.adapter = src.adapter
        self.cfg = AutoConfig.from_pretrained(src.folder, trust_remote_code=trust)
        self._trust = trust
        self._auto = AutoModelForCausalLM
        self._skeletons: dict[tuple | None, torch.nn.Module] = {None: self._skeleton(self.cfg)}
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
        overrides: dict[str, Any] | None = None,
        replace: dict[str, torch.Tensor] | None = None,
        on_read: Callable[[str, torch.Tensor], None] | None = None,
    ) -> torch.nn.Module:
        """Decoder layer ``i`` on the device; a converted one with ``overrides`` (config
        attributes, ``Target.layer_overrides``) and ``replace`` (its new tensors).

        ``on_read(name, tensor)`` sees each source tensor as read, before the cast, so the
        caller can write the tensors the conversion keeps without reading them again.
        """
        key = tuple(sorted((overrides or {}).items())) or None
        if key not in self._skeletons:
            cfg = copy.deepcopy(self.cfg)
            for attr, value in key:
                setattr(cfg, attr, value)
            self._skeletons[key] = self._skeleton(cfg)
        prefix = self._prefix(i)
        mod = copy.deepcopy(self._skeletons[key].get_submodule(prefix.rstrip(".")))
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


#: Tokens a decoder layer's forward sees at once: a calibration batch goes through in pieces
#: of whole sequences, so the forward's temporaries (the MLP's intermediates above all) are a
#: piece's, not the batch's; the statistics are sums, so the pieces add up to the batch.
FORWARD_TOKENS = 512


def run_layer(
    layer: torch.nn.Module,
    factory: LayerFactory,
    i: int,
    h: torch.Tensor,
    samples: AttentionSamples | None = None,
) -> torch.Tensor:
    """Layer ``i``'s outputs for the batch ``h``, computed a few sequences at a time; what
    ``samples`` captured of the pieces is joined back into one entry for the batch."""
    per = max(1, FORWARD_TOKENS // max(h.shape[1], 1))
    outs, context = [], {}
    for piece in h.split(per):
        if piece.shape[0] not in context:  # positions, RoPE and mask: one per piece shape
            context = {piece.shape[0]: factory.context(i, piece)}
        out = layer(piece, **context[piece.shape[0]])
        outs.append(out[0] if isinstance(out, tuple) else out)
    if samples is not None:
        samples.join_last(len(outs))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


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


class LayerReads:
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
