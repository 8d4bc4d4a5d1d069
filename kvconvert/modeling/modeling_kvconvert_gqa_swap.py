"""What kvconvert's GQA models of gpt2, opt and gpt_neox share: the stock model with each
decoder layer's attention swapped for one with fewer key/value heads.

Written into those outputs beside the family's ``modeling_kvconvert_<arch>.py``, which imports
it, and loaded with ``trust_remote_code=True``; it imports transformers only (public module
paths), never kvconvert. A family file defines its attention module (its own weight layout and
projections) and names where the stock model keeps the layers; everything else (embeddings,
norms, MLP, positions, cache, masks, ``generate()``) stays the stock code. Each attention's
forward looks up ``ALL_ATTENTION_FUNCTIONS`` itself and takes every shape from its input:
engines that read the forward (vLLM's Transformers backend parses it for that lookup and
traces it knowing only the input's rank) put their own attention in there.
"""

from __future__ import annotations

from torch import nn
from transformers.cache_utils import Cache


def pick_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache the stock layer passed: under the family's own argument name or, from
    transformers 5.24 on, ``cache`` (taken out of ``kwargs``)."""
    renamed = kwargs.pop("cache", None)
    return cache if renamed is None else renamed


class GQASwap:
    """Mixin for a stock model class: once the stock ``__init__`` has built the model, the
    attention of each decoder layer (attribute ``gqa_attribute`` of the layers at
    ``gqa_layers``, a path below the base model, so that one mixin serves both the bare model
    and the LM) becomes ``gqa_attention(config, layer_idx)``."""

    gqa_attention: type[nn.Module]
    gqa_layers: str
    gqa_attribute: str

    def __init__(self, config) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.base_model.get_submodule(self.gqa_layers)):
            setattr(layer, self.gqa_attribute, self.gqa_attention(config, i))
        self.post_init()


__all__ = ["GQASwap", "pick_cache"]
