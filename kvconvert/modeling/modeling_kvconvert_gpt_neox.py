"""GPT-NeoX (Pythia) with grouped-query attention: fewer key/value heads than query heads.

Written into kvconvert outputs converted from ``gpt_neox`` checkpoints and loaded with
``trust_remote_code=True``; it imports transformers only (public module paths), never kvconvert.
Transformers' GPT-NeoX has no GQA, and its fused ``query_key_value`` interleaves q/k/v per head,
so it cannot hold fewer KV heads; everything else (embeddings, LayerNorms, parallel residual,
GELU MLP, partial rotary) is the stock code, reused by subclassing. The swap itself
(``GQASwap``, the attention call) is ``modeling_kvconvert_gqa_swap.py``, shipped beside this
file.

Weight layout: the stock one, except that each layer's attention stores its projections
separately instead of the fused ``query_key_value``:

- ``gpt_neox.layers.{i}.attention.q_proj``: (num_attention_heads * head_dim, hidden)
- ``gpt_neox.layers.{i}.attention.k_proj``, ``v_proj``: (num_key_value_heads * head_dim, hidden)
- ``gpt_neox.layers.{i}.attention.dense``: unchanged, (hidden, hidden)

(weights and, with ``attention_bias``, biases; heads are contiguous row blocks). Query head
``h`` reads KV head ``h // (num_attention_heads // num_key_value_heads)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    GPTNeoXForCausalLM,
    GPTNeoXModel,
    apply_rotary_pos_emb,
)
from transformers.models.llama.modeling_llama import eager_attention_forward

from .configuration_kvconvert_gpt_neox import KVConvertGPTNeoXConfig
from .modeling_kvconvert_gqa_swap import GQASwap, pick_cache


class KVConvertGPTNeoXAttention(GPTNeoXAttention):
    """GPT-NeoX attention with ``config.num_key_value_heads`` KV heads.

    Subclasses the stock class only so that ``output_attentions`` still finds it; every
    weight is defined here (separate q/k/v instead of the fused per-head ``query_key_value``).
    """

    def __init__(self, config: KVConvertGPTNeoXConfig, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_size = d = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = d**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hid, kv, bias = config.hidden_size, config.num_key_value_heads * d, config.attention_bias
        self.q_proj = nn.Linear(hid, hid, bias=bias)
        self.k_proj = nn.Linear(hid, kv, bias=bias)
        self.v_proj = nn.Linear(hid, kv, bias=bias)
        self.dense = nn.Linear(hid, hid, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer_past: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer_past = pick_cache(layer_past, kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_size)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # rotates the leading rotary_pct dims
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.dense(out), weights


class GPTNeoXGQA(GQASwap):
    """GPT-NeoX's layers (``layers``) with ``KVConvertGPTNeoXAttention`` as their
    ``attention``."""

    config_class = KVConvertGPTNeoXConfig
    gqa_attention = KVConvertGPTNeoXAttention
    gqa_layers, gqa_attribute = "layers", "attention"


class KVConvertGPTNeoXModel(GPTNeoXGQA, GPTNeoXModel):
    pass


class KVConvertGPTNeoXForCausalLM(GPTNeoXGQA, GPTNeoXForCausalLM):
    pass


__all__ = ["KVConvertGPTNeoXForCausalLM", "KVConvertGPTNeoXModel"]
