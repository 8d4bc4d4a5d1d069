"""PoD: proximal tokens over distant tokens, with layer key sharing (Llama-layout decoders).

Each query splits the keys before it into *proximal* ones (the first ``pod_sink`` tokens and
the ``pod_recent`` tokens just before it) and *distant* ones (all others). Within a block of
consecutive layers (per KV head, ``config.pod_map``) an upper layer scores proximal tokens with
its own keys and distant tokens with the block bottom's keys, in one softmax; values are always
its own. So the cache really holds less: a block bottom keeps all its keys, an upper layer
keeps keys only for the sink and a rolling recent window, every layer keeps all its values.

The split is relative to each query's position, so prefill and cached decoding agree. Reads
top to bottom: cache, rotary, attention, decoder layer, model, causal-LM head. Public
transformers API only; eager and SDPA attention.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_kvconvert_pod import KVConvertPodConfig


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

    def __init__(self, config: KVConvertPodConfig, sliding: list[int | None] | None = None):
        # ``sliding[i]``: the window of a sliding-window layer that keeps the stock sliding cache
        # (it never shares keys, so it holds only its window, as the stock cache does)
        self.windows = sliding or [None] * len(config.pod_map)
        layers = [
            PodCacheLayer(config.pod_map, i) if w is None else DynamicSlidingWindowLayer(w)
            for i, w in enumerate(self.windows)
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
    cache: Cache | None, config: KVConvertPodConfig, sliding: list[int | None] | None = None
) -> PodCache:
    """The PodCache to run with: the caller's, or a new one in place of none or of an empty
    stock cache (e.g. the DynamicCache that ``generate()`` makes); a filled one is refused."""
    if isinstance(cache, PodCache):
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"PoD models need a PodCache, got a filled {type(cache).__name__}")
    return PodCache(config, sliding)


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


# --- layers -----------------------------------------------------------------------------------
class PodRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class PodRotaryEmbedding(nn.Module):
    def __init__(self, config: KVConvertPodConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: KVConvertPodConfig, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, heads, slen, dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, heads, n_rep, slen, dim)
    return hidden_states.reshape(batch, heads * n_rep, slen, dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    """Softmax attention with a boolean mask (True = attend)."""
    key, value = (
        repeat_kv(key, module.num_key_value_groups),
        repeat_kv(value, module.num_key_value_groups),
    )
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class PodAttention(nn.Module):
    """Attention whose borrowing heads read distant tokens through the block bottom's keys."""

    def __init__(self, config: KVConvertPodConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, kv, d = config.num_attention_heads, config.num_key_value_heads, self.head_dim
        qkv_bias = config.attention_qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=qkv_bias)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=config.attention_out_bias)

    def forward(self, hidden_states, position_embeddings, masks, cache: PodCache, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        keys, values = cache.update(key, value, self.layer_idx)
        full_mask, split_mask = masks
        mask = split_mask if cache.layers[self.layer_idx].shares else full_mask
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            query,
            keys,
            values,
            mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class PodMLP(nn.Module):
    def __init__(self, config: KVConvertPodConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PodDecoderLayer(nn.Module):
    def __init__(self, config: KVConvertPodConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PodAttention(config, layer_idx)
        self.mlp = PodMLP(config)
        self.input_layernorm = PodRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = PodRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, masks, cache, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, masks, cache, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


# --- model ------------------------------------------------------------------------------------
class KVConvertPodPreTrainedModel(PreTrainedModel):
    config_class = KVConvertPodConfig
    config: KVConvertPodConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["PodDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False


class KVConvertPodModel(KVConvertPodPreTrainedModel):
    def __init__(self, config: KVConvertPodConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            PodDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = PodRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = PodRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("PoD models take a 2D padding attention_mask (batch, tokens)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # without use_cache a fresh PodCache lives for this forward only
        cache = pod_cache(past_key_values, self.config)
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]
        position_ids = position_ids.expand(batch, -1)
        cache.begin(position_ids, attention_mask)
        masks = {}
        windows = [
            self.config.sliding_window if kind == "sliding_attention" else None
            for kind in self.config.layer_types
        ]
        for w in set(windows):
            masks[w] = pod_masks(cache, length, w)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer, w in zip(self.layers, windows, strict=True):
            hidden_states = layer(hidden_states, position_embeddings, masks[w], cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=cache if use_cache else None
        )


class KVConvertPodForCausalLM(KVConvertPodPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KVConvertPodConfig):
        super().__init__(config)
        self.model = KVConvertPodModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values
        )


__all__ = [
    "KVConvertPodForCausalLM",
    "KVConvertPodModel",
    "KVConvertPodPreTrainedModel",
    "PodCache",
    "PodCacheLayer",
]
