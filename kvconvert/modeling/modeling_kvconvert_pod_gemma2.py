"""PoD on the stock Gemma 2 classes: ``Gemma2ForCausalLM`` reading keys from the PodCache.

Written into PoD outputs of ``gemma2`` sources beside ``modeling_kvconvert_pod.py`` (the
PodCache, the attention function and the mixins added here) and loaded with
``trust_remote_code=True``. It imports transformers' Gemma 2 module only, never kvconvert.
"""

from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2ForCausalLM

from .configuration_kvconvert_pod_gemma2 import KVConvertPodGemma2Config
from .modeling_kvconvert_pod import PodAttentionMixin, PodCausalLMMixin


class PodGemma2Attention(PodAttentionMixin, Gemma2Attention):
    """Gemma 2 attention (query_pre_attn_scalar, logit soft-capping, sliding layers)."""


class KVConvertPodGemma2ForCausalLM(PodCausalLMMixin, Gemma2ForCausalLM):
    config_class = KVConvertPodGemma2Config
    pod_attention = (Gemma2Attention, PodGemma2Attention)


__all__ = ["KVConvertPodGemma2ForCausalLM"]
