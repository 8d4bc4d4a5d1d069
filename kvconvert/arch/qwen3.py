"""Qwen3: Llama layout plus a per-head RMSNorm on q and on k before RoPE.

The norms' weights (one (head_dim,) vector each, shared by all heads of a layer) live at
``self_attn.q_norm`` / ``self_attn.k_norm``. Keys are merged after the norm and folded through
it with the approximation documented in ``kvconvert/gqa/qknorm.py`` (exact at identity).
OLMo2 is NOT this shape: its q/k norms span all heads of the layer (num_heads*head_dim), so
merging KV heads would change the norm itself; it is not supported.
"""

from .base import AttentionAdapter

QWEN3 = AttentionAdapter(
    name="qwen3",
    model_types=("qwen3",),
    biases=("q", "k", "v", "o"),
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    outputs={"gqa": "stock", "pod": "kvconvert", "gqa,pod": "kvconvert"},
    pod_models={"qwen3": "Qwen3"},
    notes="separate q/k/v/o; per-head q/k RMSNorm before RoPE (approximate fold, exact at "
    "identity); RoPE rotate_half",
)
