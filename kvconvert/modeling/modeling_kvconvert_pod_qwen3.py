"""PoD on the stock Qwen3 classes: ``Qwen3ForCausalLM`` reading keys from the PodCache.

Written into PoD outputs of ``qwen3`` sources beside ``modeling_kvconvert_pod.py`` (the
PodCache, the attention function and the mixins added here) and loaded with
``trust_remote_code=True``. It imports transformers' Qwen3 module only, never kvconvert.
"""

from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3ForCausalLM

from .configuration_kvconvert_pod_qwen3 import KVConvertPodQwen3Config
from .modeling_kvconvert_pod import PodAttentionMixin, PodCausalLMMixin


class PodQwen3Attention(PodAttentionMixin, Qwen3Attention):
    """Qwen3 attention (per-head q/k RMSNorm before RoPE) on the PodCache."""


class KVConvertPodQwen3ForCausalLM(PodCausalLMMixin, Qwen3ForCausalLM):
    config_class = KVConvertPodQwen3Config
    pod_attention = (Qwen3Attention, PodQwen3Attention)


__all__ = ["KVConvertPodQwen3ForCausalLM"]
