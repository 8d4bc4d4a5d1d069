"""OPT with grouped-query attention: fewer key/value heads than query heads.

Written into kvconvert outputs converted from ``opt`` checkpoints and loaded with
``trust_remote_code=True``; it imports transformers only (public module paths), never kvconvert.
Transformers' OPT has no GQA; everything but the attention (learned positions with their offset
of 2, LayerNorm before or after, ReLU MLP, ``project_in`` / ``project_out``) is the stock code,
reused by subclassing. The swap itself (``GQASwap``, the attention call) is
``modeling_kvconvert_gqa_swap.py``, shipped beside this file.

Weight layout: the stock one; only ``model.decoder.layers.{i}.self_attn.k_proj`` and
``v_proj`` (weights and biases) are smaller, ``num_key_value_heads * head_dim`` rows (heads
are contiguous row blocks). Query head ``h`` reads KV head
``h // (num_attention_heads // num_key_value_heads)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM, OPTModel

from .configuration_kvconvert_opt import KVConvertOPTConfig
from .modeling_kvconvert_gqa_swap import GQASwap, pick_cache


class KVConvertOPTAttention(OPTAttention):
    """OPT attention with ``config.num_key_value_heads`` KV heads.

    Subclasses the stock class only so that ``output_attentions`` still finds it; every
    weight is defined here.
    """

    def __init__(self, config: KVConvertOPTConfig, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = hid = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d = hid // self.num_heads
        self.num_key_value_groups = self.num_heads // config.num_key_value_heads
        self.dropout = config.attention_dropout
        self.enable_bias = bias = config.enable_bias
        self.scaling = d**-0.5
        self.is_causal = True
        kv = config.num_key_value_heads * d
        self.k_proj = nn.Linear(hid, kv, bias=bias)
        self.v_proj = nn.Linear(hid, kv, bias=bias)
        self.q_proj = nn.Linear(hid, hid, bias=bias)
        self.out_proj = nn.Linear(hid, hid, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        past_key_values = pick_cache(past_key_values, kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        # as the stock OPT: the query is scaled before the product, the attention call by 1.0
        q = (self.q_proj(hidden_states) * self.scaling).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=1.0,
            **kwargs,
        )
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.out_proj(out), weights


class OPTGQA(GQASwap):
    """OPT's decoder layers (``decoder.layers``) with ``KVConvertOPTAttention`` as their
    ``self_attn``."""

    config_class = KVConvertOPTConfig
    gqa_attention = KVConvertOPTAttention
    gqa_layers, gqa_attribute = "decoder.layers", "self_attn"


class KVConvertOPTModel(OPTGQA, OPTModel):
    pass


class KVConvertOPTForCausalLM(OPTGQA, OPTForCausalLM):
    pass


__all__ = ["KVConvertOPTForCausalLM", "KVConvertOPTModel"]
