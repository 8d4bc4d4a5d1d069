"""PoD on the stock Phi-3 classes: ``Phi3ForCausalLM`` reading keys from the PodCache.

Written into PoD outputs of ``phi3`` sources beside ``modeling_kvconvert_pod.py`` (the
PodCache, the attention function and the mixins added here) and loaded with
``trust_remote_code=True``. It imports transformers' Phi-3 module only, never kvconvert.
"""

from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3ForCausalLM

from .configuration_kvconvert_pod_phi3 import KVConvertPodPhi3Config
from .modeling_kvconvert_pod import PodAttentionMixin, PodCausalLMMixin


class PodPhi3Attention(PodAttentionMixin, Phi3Attention):
    """Phi-3 attention (fused qkv_proj, partial rotary) on the PodCache."""


class KVConvertPodPhi3ForCausalLM(PodCausalLMMixin, Phi3ForCausalLM):
    config_class = KVConvertPodPhi3Config
    pod_attention = (Phi3Attention, PodPhi3Attention)


__all__ = ["KVConvertPodPhi3ForCausalLM"]
