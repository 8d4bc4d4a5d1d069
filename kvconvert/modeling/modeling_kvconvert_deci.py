"""The stock Llama model with each layer's KV heads (and MLP width) read from ``block_configs``.

Written into kvconvert outputs in the DeciLM / Nemotron-NAS layout and loaded with
``trust_remote_code=True``; it uses only public transformers API and imports nothing from
kvconvert. Weight names are Llama's; layer i's ``k_proj``/``v_proj`` have that layer's KV
heads. The stock classes are built as they are, then each layer's attention and MLP are
rebuilt from a copy of the config that carries that layer's sizes. Forward, cache, masks and
``generate()`` are the stock Llama code, so whatever the installed transformers version calls
its arguments, this model calls them the same.
"""

from __future__ import annotations

import copy

from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

from .configuration_kvconvert_deci import KVConvertDeciConfig


def layer_config(config: KVConvertDeciConfig, layer: int) -> KVConvertDeciConfig:
    """A copy of ``config`` with ``layer``'s KV heads and MLP width, as the stock modules read
    them (only while they are built)."""
    own = copy.copy(config)
    own.num_key_value_heads = config.kv_heads(layer)
    own.intermediate_size = config.mlp_width(layer)
    return own


def size_layers(model: LlamaModel, config: KVConvertDeciConfig) -> None:
    """Rebuild each decoder layer's attention and MLP with the layer's own sizes. The modules
    then point back at the shared config, so that switching the attention implementation
    after loading reaches every layer."""
    for i, layer in enumerate(model.layers):
        own = layer_config(config, i)
        layer.self_attn = LlamaAttention(own, i)
        layer.mlp = LlamaMLP(own)
        layer.self_attn.config = layer.mlp.config = config


class KVConvertDeciModel(LlamaModel):
    config_class = KVConvertDeciConfig

    def __init__(self, config: KVConvertDeciConfig) -> None:
        super().__init__(config)
        size_layers(self, config)
        self.post_init()


class KVConvertDeciForCausalLM(LlamaForCausalLM):
    config_class = KVConvertDeciConfig

    def __init__(self, config: KVConvertDeciConfig) -> None:
        super().__init__(config)
        size_layers(self.model, config)
        self.post_init()


__all__ = ["KVConvertDeciForCausalLM", "KVConvertDeciModel"]
