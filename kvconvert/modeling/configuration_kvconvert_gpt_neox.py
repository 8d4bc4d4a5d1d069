"""Configuration of a GPT-NeoX (Pythia) checkpoint converted by kvconvert to fewer KV heads.

Written next to ``modeling_kvconvert_gpt_neox.py`` into converted checkpoints and loaded with
``trust_remote_code=True``. It is the stock ``GPTNeoXConfig`` (every key keeps its meaning)
plus ``num_key_value_heads``, the number of key/value heads each layer caches; it must divide
``num_attention_heads``.
"""

from __future__ import annotations

from transformers import GPTNeoXConfig


class KVConvertGPTNeoXConfig(GPTNeoXConfig):
    """GPT-NeoX with grouped-query attention: ``num_key_value_heads`` KV heads per layer."""

    model_type = "kvconvert_gpt_neox"
    base_model_tp_plan = {
        "layers.*.attention.q_proj": "colwise",
        "layers.*.attention.k_proj": "colwise",
        "layers.*.attention.v_proj": "colwise",
        "layers.*.attention.dense": "rowwise",
        "layers.*.mlp.dense_h_to_4h": "colwise",
        "layers.*.mlp.dense_4h_to_h": "rowwise",
    }

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


__all__ = ["KVConvertGPTNeoXConfig"]
