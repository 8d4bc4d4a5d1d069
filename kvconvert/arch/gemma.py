"""Gemma and Gemma 2: the Llama projection layout with Gemma's own details.

head_dim is its own config key (256 in Gemma 2B while hidden/heads is 256 or 288), embeddings
are scaled by sqrt(hidden), and Gemma 2 adds attention/final logit soft-capping,
``query_pre_attn_scalar`` and alternating sliding-window layers (``layer_types``). None of
these touch the q/k/v/o weights: the conversion keeps every config key but
``num_key_value_heads`` verbatim, so the stock classes apply them unchanged.
"""

from .base import AttentionAdapter

GEMMA = AttentionAdapter(
    name="gemma",
    model_types=("gemma", "gemma2"),
    biases=("q", "k", "v", "o"),
    outputs={"gqa": "stock", "pod": "kvconvert", "gqa,pod": "kvconvert"},
    pod_models={"gemma": "Gemma", "gemma2": "Gemma2"},
    notes="separate q/k/v/o; explicit head_dim; scaled embeddings, soft-capping and sliding "
    "layers (gemma2) kept from the config; RoPE rotate_half",
)
