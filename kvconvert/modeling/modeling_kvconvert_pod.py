"""PoD: proximal tokens over distant tokens, with layer key sharing, on the stock classes.

Each query splits the keys before it into *proximal* ones (the first ``pod_sink`` tokens and
the ``pod_recent`` tokens just before it) and *distant* ones (all others). Within a block of
consecutive layers (per KV head, ``config.pod_map``) an upper layer scores proximal tokens with
its own keys and distant tokens with the block bottom's keys, in one softmax; values are always
its own. So the cache really holds less: a block bottom keeps all its keys, an upper layer
keeps keys only for the sink and a rolling recent window, every layer keeps all its values.
The split is relative to each query's position, so prefill and cached decoding agree.

Every model here is a stock transformers ``*ForCausalLM`` whose attention modules run the
stock attention forward unchanged (fused qkv, q/k norms, partial rotary, soft-capping, GPT-NeoX's
parallel residual, OPT's learned positions all stay the stock code's). Only two things differ,
both in the ``PodCache`` below: ``cache.update`` hands an upper layer of a block its distant
keys from the block bottom and its proximal keys from its own window, and ``cache.masks``
gives the matching proximal/distant mask, which the attention passes on in place of the stock
mask. A checkpoint may also carry ``pod_distant_bias``: per borrowing head, a number added to
its distant tokens' logits (through that mask, which then becomes additive and per head).
Public transformers API only; eager and SDPA attention. Reads top to bottom: cache,
the two mixins, one small pair of classes per architecture.
"""

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.gemma.modeling_gemma import GemmaAttention, GemmaForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2ForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3ForCausalLM

from .configuration_kvconvert_pod import (
    KVConvertPodConfig,
    KVConvertPodGemma2Config,
    KVConvertPodGemmaConfig,
    KVConvertPodGPTNeoXConfig,
    KVConvertPodOPTConfig,
    KVConvertPodPhi3Config,
    KVConvertPodQwen3Config,
    sliding_windows,
)

# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
# ``cache`` (in every stock class at once): read the installed names from the public
# signatures, accept both from callers, pass on the one the stock classes take.
CACHE_ARG = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    else "past_key_values"
)


def pick_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache a caller passed, under either name (the new one is removed from kwargs)."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values


# --- cache ------------------------------------------------------------------------------------
def runs(places: list[tuple[object, int]]) -> list[tuple[object, int, int]]:
    """Merge per-head (where, index) into contiguous (where, start, stop) slices."""
    out: list[tuple[object, int, int]] = []
    for where, i in places:
        if out and out[-1][0] == where and out[-1][2] == i:
            out[-1] = (where, out[-1][1], i + 1)
        else:
            out.append((where, i, i + 1))
    return out


def cat_heads(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class PodCacheLayer(CacheLayerMixin):
    """One layer's cache: full keys of the heads it owns, windowed keys of the heads it borrows.

    ``keys``: (batch, owned heads, tokens, head_dim), every token. ``window_keys``: (batch,
    borrowing heads, kept, head_dim), only the slots in ``PodCache.kept_slots`` (sink and recent
    window). ``values``: (batch, all KV heads, tokens, head_dim), every token.
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, pod_map: list[list[int]], layer_idx: int):
        super().__init__()
        sources = pod_map[layer_idx]
        self.owned = [h for h, b in enumerate(sources) if b == layer_idx]
        self.borrowing = [h for h, b in enumerate(sources) if b != layer_idx]
        self.shares = bool(self.borrowing)
        self.window_keys: torch.Tensor | None = None
        # Per KV head, where its keys live, as contiguous slices: distant tokens in the full
        # keys of its block bottom (layer, start, stop); proximal tokens in this layer's full
        # keys ("own") or window keys ("window").
        owned_by = {src: [g for g, b in enumerate(pod_map[src]) if b == src] for src in sources}
        self.distant_runs = runs([(src, owned_by[src].index(h)) for h, src in enumerate(sources)])
        self.proximal_runs = runs(
            [
                ("own", self.owned.index(h))
                if b == layer_idx
                else ("window", self.borrowing.index(h))
                for h, b in enumerate(sources)
            ]
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, _, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, len(self.owned), 0, d)
        self.window_keys = key_states.new_zeros(b, len(self.borrowing), 0, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens: owned heads' keys, borrowing heads' keys (window), all values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.owned:
            self.keys = torch.cat([self.keys, key_states[:, self.owned]], dim=-2)
        if self.borrowing:
            self.window_keys = torch.cat([self.window_keys, key_states[:, self.borrowing]], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def evict(self, keep: torch.Tensor | None) -> None:
        """Keep only the window slots that a later query can still see as proximal."""
        if self.borrowing and keep is not None:
            self.window_keys = self.window_keys.index_select(2, keep)

    def cached_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this layer holds (for measuring the cache's bytes)."""
        if not self.is_initialized:
            return ()
        return (self.keys, self.window_keys, self.values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.values.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.window_keys = None
        self.is_initialized = False

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            self.keys, self.window_keys, self.values = (
                fn(self.keys),
                fn(self.window_keys),
                fn(self.values),
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])


class PodCache(Cache):
    """The cache of a PoD model: per-layer ``PodCacheLayer`` plus the token bookkeeping.

    ``positions`` and ``valid`` (batch, tokens) record each cached slot's position id and
    whether it is a real token (not padding); ``kept_slots`` are the slots whose keys upper
    layers still hold. ``begin`` is called once per forward, before the layers run.
    """

    def __init__(self, config, windows: list[int | None], stock_sliding: bool = True):
        # ``windows[i]``: layer i's sliding window (None: full attention). With
        # ``stock_sliding`` a sliding layer keeps the stock sliding cache (it never shares keys,
        # so it holds only its window, as the stock cache does); without, it is a PoD layer
        # like the others and its window lives in its mask only.
        self.windows = windows
        layers = [
            DynamicSlidingWindowLayer(w)
            if w is not None and stock_sliding
            else PodCacheLayer(config.pod_map, i)
            for i, w in enumerate(windows)
        ]
        super().__init__(layers=layers)
        self.sink, self.recent = config.pod_sink, config.pod_recent
        self._masks: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.kept_slots: torch.Tensor | None = None
        self.window_slots: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def begin(self, position_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        """Record the new tokens; set ``window_slots`` (slots whose own keys this forward sees)
        and ``keep`` (which of them stay in the window after it)."""
        past = self.get_seq_length()
        batch, q = position_ids.shape
        device = position_ids.device
        total = past + q
        if padding_mask is None:
            valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        elif padding_mask.shape[1] in (total, q):
            valid = padding_mask[:, -total:].to(device=device, dtype=torch.bool)
        else:
            raise ValueError(
                f"attention_mask covers {padding_mask.shape[1]} tokens; expected {total} "
                f"(cached + new) or {q} (new)"
            )
        if self.positions is None:
            self.positions, self.valid = position_ids, valid
            self.kept_slots = torch.zeros(0, dtype=torch.long, device=device)
        else:
            self.positions = torch.cat([self.positions, position_ids], dim=1)
            if valid.shape[1] == q:  # the mask covers only the new tokens
                valid = torch.cat([self.valid, valid], dim=1)
            self.valid = valid
        new = torch.arange(past, past + q, device=device)
        self.window_slots = torch.cat([self.kept_slots, new])
        pos, ok = self.positions[:, self.window_slots], self.valid[:, self.window_slots]
        is_sink = (ok & (pos < self.sink)).any(dim=0)
        is_recent = self.window_slots >= total - self.recent
        self.keep = torch.nonzero(is_sink | is_recent).flatten()
        self.kept_slots = self.window_slots[self.keep]
        self._masks = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Store a layer's new tokens; return the keys and values its attention reads.

        A layer that borrows gets its heads' distant keys (all slots, from the block bottoms)
        followed by its proximal keys (``window_slots``), and values to match; see ``masks``.
        """
        layer = self.layers[layer_idx]
        if not isinstance(layer, PodCacheLayer):  # a stock sliding-window layer
            return layer.update(key_states, value_states)
        layer.update(key_states, value_states)
        if not layer.shares:
            return layer.keys, layer.values
        slots = self.window_slots
        distant = cat_heads([self.layers[src].keys[:, a:b] for src, a, b in layer.distant_runs])
        proximal = cat_heads(
            [
                layer.keys[:, a:b].index_select(2, slots)
                if where == "own"
                else layer.window_keys[:, a:b]
                for where, a, b in layer.proximal_runs
            ]
        )
        keys = torch.cat([distant, proximal], dim=2)
        values = torch.cat([layer.values, layer.values.index_select(2, slots)], dim=2)
        layer.evict(self.keep)  # the tensors above are copies: the window can shrink now
        return keys, values

    def masks(self, layer_idx: int, query_length: int) -> torch.Tensor:
        """Boolean mask (batch, 1, queries, keys) matching what ``update`` returns for the
        layer; ask before its ``update`` (a sliding layer's held tokens count then)."""
        window = self.windows[layer_idx]
        if window not in self._masks:
            self._masks[window] = pod_masks(self, query_length, window)
        full, split = self._masks[window]
        layer = self.layers[layer_idx]
        if isinstance(layer, PodCacheLayer):
            return split if layer.shares else full
        held = layer.keys.shape[-2] if layer.is_initialized else 0
        return full[..., full.shape[-1] - query_length - held :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions, self.valid = self.positions[indices], self.valid[indices]


def pod_cache(
    cache: Cache | None, config, windows: list[int | None], stock_sliding: bool = True
) -> PodCache:
    """The PodCache to run with: the caller's, or a new one in place of none or of an empty
    stock cache (e.g. the DynamicCache that ``generate()`` makes); a filled one is refused."""
    if isinstance(cache, PodCache):
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"PoD models need a PodCache, got a filled {type(cache).__name__}")
    return PodCache(config, windows, stock_sliding)


def pod_masks(
    cache: PodCache, query_length: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (batch, 1, queries, keys) for one forward, True = may attend.

    Returns ``full`` over all cached slots (ordinary causal + padding [+ sliding window]) and
    ``split``: the distant part over all slots followed by the proximal part over
    ``cache.window_slots``; a query's proximal keys are the first ``sink`` positions and the
    ``recent`` positions right before it (and itself).
    """
    total = cache.get_seq_length()
    past = total - query_length
    device = cache.positions.device
    k_slot = torch.arange(total, device=device)
    q_slot = k_slot[past:]
    full = (k_slot[None, :] <= q_slot[:, None])[None] & cache.valid[:, None, :]
    if window is not None:
        full &= (q_slot[:, None] - k_slot[None, :] < window)[None]
    full |= (k_slot[None, :] == q_slot[:, None])[None]  # never an empty row (padding queries)
    q_pos = cache.positions[:, past:, None]
    k_pos = cache.positions[:, None, :]
    proximal = (k_pos < cache.sink) | (q_pos - k_pos <= cache.recent)
    slots = cache.window_slots
    split = torch.cat([full & ~proximal, (full & proximal)[:, :, slots]], dim=-1)
    return full[:, None], split[:, None]


# --- attention and model mixins -------------------------------------------------------------
class PodAttentionMixin:
    """The stock attention, reading its keys and mask from a ``PodCache``.

    The stock forward calls ``past_key_values.update`` (which returns the PoD keys and values)
    and passes ``attention_mask`` to the attention function: that mask is replaced here by the
    layer's PoD mask (additive for eager attention, boolean for SDPA). ``pod_cache_kwarg`` is
    the keyword the stock decoder layer passes the cache under where it is neither ``cache``
    (transformers >= 5.24) nor ``past_key_values`` (before).

    ``pod_bias``: this layer's row of ``config.pod_distant_bias`` (per KV head) when any entry
    is non-zero, else None. Then the mask is additive with a head dimension, (batch, heads,
    queries, keys), holding each head's bias on the distant keys ``PodCache.update`` put first.
    """

    pod_cache_kwarg = "past_key_values"
    pod_bias: tuple[float, ...] | None = None

    def forward(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get(self.pod_cache_kwarg))
        if isinstance(cache, PodCache):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            mask = cache.masks(self.layer_idx, hidden.shape[1])
            low = torch.finfo(hidden.dtype).min
            if self.pod_bias is not None and cache.layers[self.layer_idx].shares:
                bias = self.pod_bias_row(cache.get_seq_length(), mask.shape[-1], hidden)
                mask = torch.where(mask, bias, low)
            elif self.config._attn_implementation == "eager":
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
                    ~mask, low
                )
            kwargs["attention_mask"] = mask
        return super().forward(*args, **kwargs)

    def pod_bias_row(self, distant: int, keys: int, hidden: torch.Tensor) -> torch.Tensor:
        """(1, heads, 1, keys): each query head's bias on the first ``distant`` keys, 0 after."""
        heads = self.config.num_attention_heads
        made = self.__dict__.setdefault("_pod_bias_on", {})  # one host-to-device copy per device
        key = (hidden.device, hidden.dtype)
        if key not in made:
            per_kv = torch.tensor(self.pod_bias, dtype=hidden.dtype, device=hidden.device)
            made[key] = per_kv.repeat_interleave(heads // len(self.pod_bias))
        per_head = made[key]
        row = hidden.new_zeros(1, heads, 1, keys)
        row[..., :distant] = per_head[None, :, None, None]
        return row


class PodCausalLMMixin:
    """The stock causal LM with PoD attention; its forward creates and drives the PodCache.

    ``pod_attention`` = (stock attention class, its PoD subclass). The subclass adds behaviour
    only (no parameters), so each stock attention module's class is switched in place after the
    stock ``__init__``: the module tree and the checkpoint's weight names stay the stock ones.
    """

    pod_attention: tuple[type, type]
    #: sliding-window layers keep the stock sliding cache and their own keys (False: they are
    #: PoD layers whose window is in their mask, as in kvconvert's Llama-layout PoD model)
    pod_stock_sliding = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def __init__(self, config):
        super().__init__(config)
        stock, pod = self.pod_attention
        biases = getattr(config, "pod_distant_bias", None)
        for module in self.modules():
            if type(module) is stock:
                module.__class__ = pod
                row = biases[module.layer_idx] if biases else None
                module.pod_bias = tuple(float(b) for b in row) if row and any(row) else None
        self.pod_windows = sliding_windows(config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        if self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError("PoD models support eager and sdpa attention only")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("PoD models take a 2D padding attention_mask (batch, tokens)")
        past_key_values = pick_cache(past_key_values, kwargs)
        cache = pod_cache(past_key_values, self.config, self.pod_windows, self.pod_stock_sliding)
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[:2]
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = self.pod_position_ids(attention_mask, past, length, ref.device)
        position_ids = position_ids.expand(batch, -1)
        cache.begin(position_ids, attention_mask)
        # A prepared 4D mask makes the stock model skip building its own; every PoD attention
        # replaces it by its layer's mask from the cache.
        placeholder = cache.masks(self.pod_first_full_layer(), length)
        out = super().forward(
            input_ids=input_ids,
            attention_mask=placeholder,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_ARG: cache},
            **kwargs,
        )
        if use_cache is False or (use_cache is None and not self.config.use_cache):
            out[CACHE_FIELD] = None
        return out

    def pod_position_ids(
        self, attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids of new tokens when the caller gives none: the stock model's rule (the
        cache records them; sink and recent window are counted in positions)."""
        return torch.arange(past, past + length, device=device)[None]

    def pod_first_full_layer(self) -> int:
        return next((i for i, w in enumerate(self.pod_windows) if w is None), 0)


class PodLlamaAttention(PodAttentionMixin, LlamaAttention):
    """Llama-layout attention (llama, mistral, qwen2 sources) on the PodCache."""


class KVConvertPodForCausalLM(PodCausalLMMixin, LlamaForCausalLM):
    """PoD on the stock Llama classes, for llama, mistral and qwen2 sources (their decoders are
    Llama's: RMSNorm, gated MLP, RoPE). Two things the Llama config cannot say come from
    ``KVConvertPodConfig``: q/k/v and o biases apart (qwen2 has the first only) and sliding
    windows (mistral), which here are masks over a PoD cache, so sliding layers may share."""

    config_class = KVConvertPodConfig
    pod_attention = (LlamaAttention, PodLlamaAttention)
    pod_stock_sliding = False

    def __init__(self, config: KVConvertPodConfig):
        super().__init__(config)
        if config.attention_out_bias != config.attention_bias:
            for layer in self.model.layers:
                o = layer.self_attn.o_proj
                layer.self_attn.o_proj = nn.Linear(
                    o.in_features, o.out_features, bias=config.attention_out_bias
                )


class PodPhi3Attention(PodAttentionMixin, Phi3Attention):
    """Phi-3 attention (fused qkv_proj, partial rotary) on the PodCache."""


class KVConvertPodPhi3ForCausalLM(PodCausalLMMixin, Phi3ForCausalLM):
    config_class = KVConvertPodPhi3Config
    pod_attention = (Phi3Attention, PodPhi3Attention)


class PodQwen3Attention(PodAttentionMixin, Qwen3Attention):
    """Qwen3 attention (per-head q/k RMSNorm before RoPE) on the PodCache."""


class KVConvertPodQwen3ForCausalLM(PodCausalLMMixin, Qwen3ForCausalLM):
    config_class = KVConvertPodQwen3Config
    pod_attention = (Qwen3Attention, PodQwen3Attention)


class PodGemmaAttention(PodAttentionMixin, GemmaAttention):
    """Gemma attention (head_dim of its own) on the PodCache."""


class KVConvertPodGemmaForCausalLM(PodCausalLMMixin, GemmaForCausalLM):
    config_class = KVConvertPodGemmaConfig
    pod_attention = (GemmaAttention, PodGemmaAttention)


class PodGemma2Attention(PodAttentionMixin, Gemma2Attention):
    """Gemma 2 attention (query_pre_attn_scalar, logit soft-capping, sliding layers)."""


class KVConvertPodGemma2ForCausalLM(PodCausalLMMixin, Gemma2ForCausalLM):
    config_class = KVConvertPodGemma2Config
    pod_attention = (Gemma2Attention, PodGemma2Attention)


class PodGPTNeoXAttention(PodAttentionMixin, GPTNeoXAttention):
    """GPT-NeoX attention (fused per-head qkv, partial rotary); its layer passes the cache as
    ``layer_past``."""

    pod_cache_kwarg = "layer_past"


class KVConvertPodGPTNeoXForCausalLM(PodCausalLMMixin, GPTNeoXForCausalLM):
    config_class = KVConvertPodGPTNeoXConfig
    pod_attention = (GPTNeoXAttention, PodGPTNeoXAttention)


class PodOPTAttention(PodAttentionMixin, OPTAttention):
    """OPT attention (biases, no RoPE: positions are learned embeddings added to the input)."""


class KVConvertPodOPTForCausalLM(PodCausalLMMixin, OPTForCausalLM):
    config_class = KVConvertPodOPTConfig
    pod_attention = (OPTAttention, PodOPTAttention)

    def pod_position_ids(
        self, attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """OPT's rule: with a padding mask over every token, a token's position is the count of
        real tokens before it (left padding shifts them); padding gets -1."""
        if attention_mask is None or attention_mask.shape[1] != past + length:
            return super().pod_position_ids(attention_mask, past, length, device)
        mask = attention_mask.to(device=device, dtype=torch.long)
        return (mask.cumsum(dim=1) * mask - 1)[:, past:]


__all__ = [
    "KVConvertPodForCausalLM",
    "KVConvertPodGPTNeoXForCausalLM",
    "KVConvertPodGemma2ForCausalLM",
    "KVConvertPodGemmaForCausalLM",
    "KVConvertPodOPTForCausalLM",
    "KVConvertPodPhi3ForCausalLM",
    "KVConvertPodQwen3ForCausalLM",
    "PodCache",
    "PodCacheLayer",
]
