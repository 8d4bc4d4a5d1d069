"""GPT-2 with grouped-query attention: fewer key/value heads than query heads.

Written into kvconvert outputs converted from ``gpt2`` checkpoints and loaded with
``trust_remote_code=True``; it imports transformers only (public module paths), never kvconvert.
Transformers' GPT-2 cuts its fused ``c_attn`` into three equal parts and has no GQA; everything
but the attention (learned positions, LayerNorms, ``Conv1D`` MLP, the per-layer
``scale_attn_by_inverse_layer_idx`` scaling) is the stock code, reused by subclassing. The swap
itself (``GQASwap``, the attention call) is ``modeling_kvconvert_gqa_swap.py``, shipped beside
this file.

Weight layout: the stock one; only ``transformer.h.{i}.attn.c_attn`` is narrower. It is a
``Conv1D`` (weight stored (in, out) = (n_embd, (n_head + 2 * num_key_value_heads) * head_dim),
bias likewise) whose output columns are [query heads | key heads | value heads], each head a
contiguous block. Query head ``h`` reads KV head ``h // (n_head // num_key_value_heads)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2LMHeadModel, GPT2Model
from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv
from transformers.pytorch_utils import Conv1D

from .configuration_kvconvert_gpt2 import KVConvertGPT2Config
from .modeling_kvconvert_gqa_swap import GQASwap, pick_cache


class KVConvertGPT2Attention(GPT2Attention):
    """GPT-2 self-attention with ``config.num_key_value_heads`` KV heads.

    Subclasses the stock class for its ``_upcast_and_reordered_attn`` and so that
    ``output_attentions`` still finds it; every weight is defined here.
    """

    def __init__(self, config: KVConvertGPT2Config, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = hid = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d = hid // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention = False
        self.is_causal = True
        self.scaling = d**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.split_sizes = [hid, self.num_key_value_heads * d, self.num_key_value_heads * d]
        self.c_attn = Conv1D(sum(self.split_sizes), hid)
        self.c_proj = Conv1D(hid, hid)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        past_key_values = pick_cache(past_key_values, kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = self.c_attn(hidden_states).split(self.split_sizes, dim=-1)
        q, k, v = (x.view(shape).transpose(1, 2) for x in (q, k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            k = repeat_kv(k, self.num_key_value_groups)
            v = repeat_kv(v, self.num_key_value_groups)
            out, weights = self._upcast_and_reordered_attn(q, k, v, attention_mask)
            out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            out, weights = attention(
                self,
                q,
                k,
                v,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )
            out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.resid_dropout(self.c_proj(out)), weights


#: the stock list, anchored: engines that treat it as patterns of tensors to skip (vLLM's
#: Transformers backend) would otherwise drop ``c_attn.bias`` with the legacy ``attn.bias``
IGNORED_ON_LOAD = [r"(^|\.)attn\.bias$", r"(^|\.)crossattention\.bias$"]


class GPT2GQA(GQASwap):
    """GPT-2's blocks (``h``) with ``KVConvertGPT2Attention`` as their ``attn``."""

    config_class = KVConvertGPT2Config
    _keys_to_ignore_on_load_unexpected = IGNORED_ON_LOAD
    gqa_attention = KVConvertGPT2Attention
    gqa_layers, gqa_attribute = "h", "attn"


class KVConvertGPT2Model(GPT2GQA, GPT2Model):
    pass


class KVConvertGPT2LMHeadModel(GPT2GQA, GPT2LMHeadModel):
    pass


__all__ = ["KVConvertGPT2LMHeadModel", "KVConvertGPT2Model"]
