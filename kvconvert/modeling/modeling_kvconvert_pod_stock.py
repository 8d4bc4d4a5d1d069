"""PoD on stock transformers architectures (phi3, qwen3, gemma, gemma2, gpt_neox, opt).

Each model is the stock ``*ForCausalLM`` with its attention modules switched to a PoD subclass
that runs the stock attention forward unchanged: the fused qkv split, q/k norms, partial rotary,
scaling, soft-capping, sliding windows, GPT-NeoX's parallel residual and OPT's learned
positions all stay the stock code's. Only two things differ,
and both live in the shared ``PodCache`` (``modeling_kvconvert_pod.py``): ``cache.update``
hands an upper layer of a block its distant keys from the block bottom and its proximal keys
from its own window, and ``cache.masks`` gives the matching proximal/distant mask. Sliding-window
layers keep the stock sliding cache and their own keys. Public transformers API only; eager and
SDPA attention.
"""

import torch
from transformers.models.gemma.modeling_gemma import GemmaAttention, GemmaForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2ForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXForCausalLM
from transformers.models.opt.modeling_opt import OPTAttention, OPTForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3ForCausalLM

from .configuration_kvconvert_pod_stock import (
    KVConvertPodGemma2Config,
    KVConvertPodGemmaConfig,
    KVConvertPodGPTNeoXConfig,
    KVConvertPodOPTConfig,
    KVConvertPodPhi3Config,
    KVConvertPodQwen3Config,
    sliding_windows,
)
from .modeling_kvconvert_pod import PodCache, pod_cache


class PodAttentionMixin:
    """The stock attention, reading its keys and mask from a ``PodCache``.

    The stock forward calls ``past_key_values.update`` (which returns the PoD keys and values)
    and passes ``attention_mask`` to the attention function: that mask is replaced here by the
    layer's PoD mask (additive for eager attention, boolean for SDPA). ``pod_cache_kwarg`` is
    the keyword the stock decoder layer passes the cache under.
    """

    pod_cache_kwarg = "past_key_values"

    def forward(self, *args, **kwargs):
        cache = kwargs.get(self.pod_cache_kwarg)
        if isinstance(cache, PodCache):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            mask = cache.masks(self.layer_idx, hidden.shape[1])
            if self.config._attn_implementation == "eager":
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(hidden.dtype).min
                )
            kwargs["attention_mask"] = mask
        return super().forward(*args, **kwargs)


class PodCausalLMMixin:
    """The stock causal LM with PoD attention; its forward creates and drives the PodCache.

    ``pod_attention`` = (stock attention class, its PoD subclass). The subclass adds behaviour
    only (no parameters), so each stock attention module's class is switched in place after the
    stock ``__init__``: the module tree and the checkpoint's weight names stay the stock ones.
    """

    pod_attention: tuple[type, type]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def __init__(self, config):
        super().__init__(config)
        stock, pod = self.pod_attention
        for module in self.modules():
            if type(module) is stock:
                module.__class__ = pod
        self.pod_windows = sliding_windows(config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        if self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError("PoD models support eager and sdpa attention only")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("PoD models take a 2D padding attention_mask (batch, tokens)")
        cache = pod_cache(past_key_values, self.config, self.pod_windows)
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[:2]
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = self.pod_position_ids(attention_mask, past, length, ref.device)
        position_ids = position_ids.expand(batch, -1)
        cache.begin(position_ids, attention_mask)
        # A prepared 4D mask makes the stock model skip building its own; every PoD attention
        # replaces it by its layer's mask from the cache.
        placeholder = cache.masks(self.pod_first_full_layer(), length)
        out = super().forward(
            input_ids=input_ids,
            attention_mask=placeholder,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if use_cache is False or (use_cache is None and not self.config.use_cache):
            out.past_key_values = None
        return out

    def pod_position_ids(
        self, attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids of new tokens when the caller gives none: the stock model's rule (the
        cache records them; sink and recent window are counted in positions)."""
        return torch.arange(past, past + length, device=device)[None]

    def pod_first_full_layer(self) -> int:
        return next((i for i, w in enumerate(self.pod_windows) if w is None), 0)


class PodPhi3Attention(PodAttentionMixin, Phi3Attention):
    """Phi-3 attention (fused qkv_proj, partial rotary) on the PodCache."""


class KVConvertPodPhi3ForCausalLM(PodCausalLMMixin, Phi3ForCausalLM):
    config_class = KVConvertPodPhi3Config
    pod_attention = (Phi3Attention, PodPhi3Attention)


class PodQwen3Attention(PodAttentionMixin, Qwen3Attention):
    """Qwen3 attention (per-head q/k RMSNorm before RoPE) on the PodCache."""


class KVConvertPodQwen3ForCausalLM(PodCausalLMMixin, Qwen3ForCausalLM):
    config_class = KVConvertPodQwen3Config
    pod_attention = (Qwen3Attention, PodQwen3Attention)


class PodGemmaAttention(PodAttentionMixin, GemmaAttention):
    """Gemma attention (head_dim of its own) on the PodCache."""


class KVConvertPodGemmaForCausalLM(PodCausalLMMixin, GemmaForCausalLM):
    config_class = KVConvertPodGemmaConfig
    pod_attention = (GemmaAttention, PodGemmaAttention)


class PodGemma2Attention(PodAttentionMixin, Gemma2Attention):
    """Gemma 2 attention (query_pre_attn_scalar, logit soft-capping, sliding layers)."""


class KVConvertPodGemma2ForCausalLM(PodCausalLMMixin, Gemma2ForCausalLM):
    config_class = KVConvertPodGemma2Config
    pod_attention = (Gemma2Attention, PodGemma2Attention)


class PodGPTNeoXAttention(PodAttentionMixin, GPTNeoXAttention):
    """GPT-NeoX attention (fused per-head qkv, partial rotary); its layer passes the cache as
    ``layer_past``."""

    pod_cache_kwarg = "layer_past"


class KVConvertPodGPTNeoXForCausalLM(PodCausalLMMixin, GPTNeoXForCausalLM):
    config_class = KVConvertPodGPTNeoXConfig
    pod_attention = (GPTNeoXAttention, PodGPTNeoXAttention)


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


__all__ = [
    "KVConvertPodGPTNeoXForCausalLM",
    "KVConvertPodGemma2ForCausalLM",
    "KVConvertPodGemmaForCausalLM",
    "KVConvertPodOPTForCausalLM",
    "KVConvertPodPhi3ForCausalLM",
    "KVConvertPodQwen3ForCausalLM",
]
