"""PoD on the stock Gemma classes: ``GemmaForCausalLM`` reading keys from the PodCache.

Written into PoD outputs of ``gemma`` sources beside ``modeling_kvconvert_pod.py`` (the
PodCache, the attention function and the mixins added here) and loaded with
``trust_remote_code=True``. It imports transformers' Gemma module only, never kvconvert.
"""

from transformers.models.gemma.modeling_gemma import GemmaAttention, GemmaForCausalLM

from .configuration_kvconvert_pod_gemma import KVConvertPodGemmaConfig
from .modeling_kvconvert_pod import PodAttentionMixin, PodCausalLMMixin


class PodGemmaAttention(PodAttentionMixin, GemmaAttention):
    """Gemma attention (head_dim of its own) on the PodCache."""


class KVConvertPodGemmaForCausalLM(PodCausalLMMixin, GemmaForCausalLM):
    config_class = KVConvertPodGemmaConfig
    pod_attention = (GemmaAttention, PodGemmaAttention)


__all__ = ["KVConvertPodGemmaForCausalLM"]
