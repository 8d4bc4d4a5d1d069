"""Configuration of a GPT-2 checkpoint converted by kvconvert to fewer KV heads.

Written next to ``modeling_kvconvert_gpt2.py`` into converted checkpoints and loaded with
``trust_remote_code=True``. It is the stock ``GPT2Config`` (every key keeps its meaning) plus
``num_key_value_heads``, the number of key/value heads each layer caches; it must divide
``n_head``. Cross-attention (``add_cross_attention``) is not supported.
"""

from __future__ import annotations

from transformers import GPT2Config


class KVConvertGPT2Config(GPT2Config):
    """GPT-2 with grouped-query attention: ``num_key_value_heads`` KV heads per layer."""

    model_type = "kvconvert_gpt2"

    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_head
        g = self.num_key_value_heads
        if g < 1 or self.n_head % g:
            raise ValueError(f"num_key_value_heads={g} must divide n_head={self.n_head}")
        if self.add_cross_attention:
            raise ValueError("kvconvert's GPT-2 does not support add_cross_attention")
        super().__post_init__(**kwargs)


__all__ = ["KVConvertGPT2Config"]
