"""Llama-layout attention: separate q/k/v/o projections, RoPE in ``rotate_half`` layout.

Covers llama, mistral and qwen2 (qwen2 adds biases on q/k/v; llama may have them with
``attention_bias``). Biases are read from the checkpoint whenever present.
"""

from .base import AttentionAdapter

LLAMA = AttentionAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    biases=("q", "k", "v", "o"),
    outputs={"gqa": "stock", "pod": "kvconvert", "gqa,pod": "kvconvert"},
    llama_decoder=True,
    notes="separate q/k/v/o; RoPE rotate_half; q/k/v biases (qwen2, llama attention_bias)",
)
