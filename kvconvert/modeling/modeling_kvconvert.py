"""A Llama-family decoder whose layers may differ in KV heads and may project rotated keys.

Written into kvconvert outputs that a stock transformers class cannot express and loaded with
``trust_remote_code=True``; it uses only public transformers API and imports nothing from
kvconvert. The layout (names of every weight) is Llama's, so llama, mistral and qwen2
checkpoints map onto it one to one. The classes are small subclasses of the stock Llama ones
(``LlamaModel``, ``LlamaForCausalLM``: norms, gated MLP, rotary embedding, decoder layer, LM
head, loss, ``generate()``) with two things of their own: each layer's attention is built
with that layer's KV head count and the source's per-projection biases, and the model forward
builds a mask per layer type (sliding-window layers of mistral/qwen2).

Post-RoPE key projection (``config.key_projection_heads[i] > 0``), the method of the GQA
paper: ``k_proj`` keeps the full width of P key heads; after RoPE, each group of t = P / G
rotated key heads is projected to one head by ``key_down[g]`` (d x t*d), and that is what the
cache stores. Query head h, which read old key head j, is projected by ``query_down[h]``
(d x d, = the decoder block of j, transposed) after its own rotation, so that
q_h . k_j ~= (query_down[h] q_h) . k'_g. The projection cannot be folded into ``q_proj``
because RoPE's position-dependent rotation sits between them.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_kvconvert import KVConvertConfig

# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
# ``cache``. Read which name the installed version uses from its public signatures, accept
# both from callers (``generate()`` passes the new one), and pass on the one it expects.
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
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


def layer_config(config: KVConvertConfig, layer_idx: int) -> KVConvertConfig:
    """A copy of the config for building one layer's stock modules: its own KV head count (an
    int, as they read it); the stock attention gives all four projections q_proj's bias flag
    (the others are rebuilt where theirs differs)."""
    layer = copy.copy(config)
    layer.num_key_value_heads = config.num_key_value_heads[layer_idx]
    layer.attention_bias = config.q_bias
    return layer


class KVConvertAttention(LlamaAttention):
    """The stock Llama attention with this layer's own KV head count, the source's biases and,
    optionally, projected rotated keys (the forward differs only there, and in passing the
    layer's sliding window on)."""

    def __init__(self, config: KVConvertConfig, layer_idx: int) -> None:
        super().__init__(layer_config(config, layer_idx), layer_idx)
        self.config = config
        d, h = self.head_dim, config.num_attention_heads
        self.num_kv_heads = g = config.num_key_value_heads[layer_idx]
        self.num_key_heads = config.key_projection_heads[layer_idx] or g  # heads from k_proj
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        )
        hid = config.hidden_size
        wanted = {  # (in, out, bias); the stock init built (in, out) with q_proj's bias flag
            "k_proj": (hid, self.num_key_heads * d, config.k_bias),
            "v_proj": (hid, g * d, config.v_bias),
            "o_proj": (h * d, hid, config.o_bias),
        }
        for name, (i, o, bias) in wanted.items():
            old = getattr(self, name)
            if (old.in_features, old.out_features, old.bias is not None) != (i, o, bias):
                setattr(self, name, nn.Linear(i, o, bias=bias))
        self.projected = bool(config.key_projection_heads[layer_idx])
        if self.projected:
            t = self.num_key_heads // g
            self.key_down = nn.Parameter(torch.zeros(g, d, t * d))
            self.query_down = nn.Parameter(torch.zeros(h, d, d))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        past_key_values = pick_cache(past_key_values, kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.projected:
            b, _, s, d = k.shape
            grouped = (
                k.view(b, self.num_kv_heads, -1, s, d)
                .transpose(2, 3)
                .reshape(b, self.num_kv_heads, s, -1)
            )
            k = torch.einsum("bgsx,gex->bgse", grouped, self.key_down)
            q = torch.einsum("bhsd,hed->bhse", q, self.query_down)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), weights


class KVConvertDecoderLayer(LlamaDecoderLayer):
    """The stock Llama decoder layer (norms, gated MLP, residuals) with this layer's attention."""

    def __init__(self, config: KVConvertConfig, layer_idx: int) -> None:
        super().__init__(layer_config(config, layer_idx), layer_idx)
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = KVConvertAttention(config, layer_idx)


@contextmanager
def without_layers(config: KVConvertConfig) -> Iterator[None]:
    """While the stock Llama ``__init__`` runs: it would build every decoder layer from one
    KV head count (an int), which this config does not have, so it builds none; the classes
    below build their own layers right after."""
    layers = config.num_hidden_layers
    config.num_hidden_layers = 0
    try:
        yield
    finally:
        config.num_hidden_layers = layers


class KVConvertPreTrainedModel(LlamaPreTrainedModel):
    """The stock Llama base with this config, this decoder layer, and the key projection's
    identity init."""

    config_class = KVConvertConfig
    config: KVConvertConfig
    _no_split_modules = ["KVConvertDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _can_compile_fullgraph = False  # per-layer KV heads were never tried under torch.compile

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights only: transformers skips tensors it loaded from the checkpoint."""
        super()._init_weights(module)
        if isinstance(module, KVConvertAttention) and module.projected:
            for p in (module.key_down, module.query_down):
                if not getattr(p, "_is_hf_initialized", False):
                    with torch.no_grad():
                        p.zero_()
                        p[..., : p.shape[1]] += torch.eye(
                            p.shape[1], dtype=p.dtype, device=p.device
                        )


class KVConvertModel(KVConvertPreTrainedModel, LlamaModel):
    """The stock Llama model (embeddings, norm, rotary embedding) with this model's layers; its
    forward differs from the stock one only in building a mask per layer type (the stock
    Llama forward builds one causal mask for all layers)."""

    def __init__(self, config: KVConvertConfig) -> None:
        with without_layers(config):
            super().__init__(config)
        self.layers = nn.ModuleList(
            [KVConvertDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.post_init()

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
        past_key_values = pick_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen
            )[None]
        mask_args = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: past_key_values},
        )
        masks = {"full_attention": create_causal_mask(**mask_args)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer.attention_type],
                **{CACHE_ARG: past_key_values},
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )


class KVConvertForCausalLM(KVConvertPreTrainedModel, LlamaForCausalLM):
    """The stock Llama causal LM (head, loss, ``generate()``) over ``KVConvertModel``."""

    def __init__(self, config: KVConvertConfig) -> None:
        with without_layers(config):
            super().__init__(config)
        self.model = KVConvertModel(config)
        self.post_init()


__all__ = ["KVConvertForCausalLM", "KVConvertModel", "KVConvertPreTrainedModel"]
