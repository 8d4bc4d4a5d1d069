"""Phi-3: q/k/v fused into one ``qkv_proj`` of (H + 2*KV)*d rows, in that order.

The fused tensor is cut into q/k/v for solving and re-fused (with the new KV count) on writing;
the calibration hook cuts the fused activation the same way. RoPE is ``rotate_half`` over the
first ``partial_rotary_factor`` of each head (the rest passes through and gets the real merge).
The stock ``Phi3ForCausalLM`` reads ``num_key_value_heads``, so the output needs no remote code.
"""

from .base import AttentionAdapter

PHI3 = AttentionAdapter(
    name="phi3",
    model_types=("phi3",),
    qkv_proj="self_attn.qkv_proj",
    rotary_fraction_key="partial_rotary_factor",
    outputs={"gqa": "stock", "pod": "kvconvert", "gqa,pod": "kvconvert"},
    pod_models={"phi3": "Phi3"},
    notes="fused qkv_proj [q; k; v] split for solving, re-fused on writing; RoPE rotate_half, "
    "partial_rotary_factor",
)
