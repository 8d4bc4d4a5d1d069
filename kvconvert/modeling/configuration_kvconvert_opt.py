"""Configuration of an OPT checkpoint converted by kvconvert to fewer KV heads.

Written next to ``modeling_kvconvert_opt.py`` into converted checkpoints and loaded with
``trust_remote_code=True``. It is the stock ``OPTConfig`` (every key keeps its meaning) plus
``num_key_value_heads``, the number of key/value heads each layer caches; it must divide
``num_attention_heads``.
"""

from __future__ import annotations

from transformers import OPTConfig


class KVConvertOPTConfig(OPTConfig):
    """OPT with grouped-query attention: ``num_key_value_heads`` KV heads per layer."""

    model_type = "kvconvert_opt"

    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        g = self.num_key_value_heads
        if g < 1 or self.num_attention_heads % g:
            raise ValueError(
                f"num_key_value_heads={g} must divide num_attention_heads="
                f"{self.num_attention_heads}"
            )
        super().__post_init__(**kwargs)


__all__ = ["KVConvertOPTConfig"]
