"""PoD on the stock Llama classes, for Llama-layout sources (llama, mistral, qwen2).

Written into kvconvert PoD outputs of those sources next to ``modeling_kvconvert_pod.py``
(the PodCache, the attention function and the mixins added here) and loaded with
``trust_remote_code=True``; it imports transformers' Llama module only, never kvconvert.
"""

from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM

from .configuration_kvconvert_pod import KVConvertPodConfig
from .modeling_kvconvert_pod import PodAttentionMixin, PodCausalLMMixin


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


__all__ = ["KVConvertPodForCausalLM"]
