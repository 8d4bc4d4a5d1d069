"""PoD on the stock OPT classes: ``OPTForCausalLM`` reading keys from the PodCache.

Written into PoD outputs of ``opt`` sources beside ``modeling_kvconvert_pod.py`` (the
PodCache, the attention function and the mixins added here) and loaded with
``trust_remote_code=True``. It imports transformers' OPT module only, never kvconvert.
"""

import torch
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM

from .configuration_kvconvert_pod_opt import KVConvertPodOPTConfig
from .modeling_kvconvert_pod import PodAttentionMixin, PodCausalLMMixin


class PodOPTAttention(PodAttentionMixin, OPTAttention):
    """OPT attention (biases, no RoPE: positions are learned embeddings added to the input)."""


class KVConvertPodOPTForCausalLM(PodCausalLMMixin, OPTForCausalLM):
    config_class = KVConvertPodOPTConfig
    pod_attention = (OPTAttention, PodOPTAttention)

    def pod_position_ids(
        self, attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """OPT's rule: with a padding mask over every token, a token's position is the count of
        real tokens before it (left padding shifts them); padding gets -1."""
        if attention_mask is None or attention_mask.shape[1] != past + length:
            return super().pod_position_ids(attention_mask, past, length, device)
        mask = attention_mask.to(device=device, dtype=torch.long)
        return (mask.cumsum(dim=1) * mask - 1)[:, past:]


__all__ = ["KVConvertPodOPTForCausalLM"]
