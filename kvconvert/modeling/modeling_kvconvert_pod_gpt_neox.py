"""PoD on the stock GPT-NeoX classes: ``GPTNeoXForCausalLM`` reading keys from the PodCache.

Written into PoD outputs of ``gpt_neox`` sources beside ``modeling_kvconvert_pod.py`` (the
PodCache, the attention function and the mixins added here) and loaded with
``trust_remote_code=True``. It imports transformers' GPT-NeoX module only, never kvconvert.
"""

from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXForCausalLM

from .configuration_kvconvert_pod_gpt_neox import KVConvertPodGPTNeoXConfig
from .modeling_kvconvert_pod import PodAttentionMixin, PodCausalLMMixin


class PodGPTNeoXAttention(PodAttentionMixin, GPTNeoXAttention):
    """GPT-NeoX attention (fused per-head qkv, partial rotary); its layer passes the cache as
    ``layer_past``."""

    pod_cache_kwarg = "layer_past"


class KVConvertPodGPTNeoXForCausalLM(PodCausalLMMixin, GPTNeoXForCausalLM):
    config_class = KVConvertPodGPTNeoXConfig
    pod_attention = (GPTNeoXAttention, PodGPTNeoXAttention)


__all__ = ["KVConvertPodGPTNeoXForCausalLM"]
