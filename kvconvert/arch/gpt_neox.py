"""GPT-NeoX (Pythia): q/k/v fused in ``attention.query_key_value`` and interleaved per head.

Rows are [q_h; k_h; v_h] for each head h, so the fused tensor cannot hold fewer KV heads than
query heads, and transformers' GPT-NeoX has no GQA: a merged output needs kvconvert's own
modeling code, which is not part of this adapter yet (``convert`` refuses ``--target gqa``
with a clear error while ``inspect`` still reports the layout). RoPE is ``rotate_half`` over
the first ``rotary_pct`` of each head; the other dims get the real merge. ``--target pod``
keeps every head, so its output is the stock class with PoD attention (``pod_models``).
"""

from .base import AttentionAdapter

GPT_NEOX = AttentionAdapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layer_prefix="gpt_neox.layers.{i}.",
    o_proj="attention.dense",
    qkv_proj="attention.query_key_value",
    qkv_layout="per_head",
    rotary_fraction_key="rotary_pct",
    biases=("q", "k", "v", "o"),
    outputs={"pod": "kvconvert"},
    pod_models={"gpt_neox": "GPTNeoX"},
    load_renames={"embed_out.weight": "lm_head.weight"},
    notes="fused qkv interleaved per head; partial rotary (rotary_pct); GQA output waits for "
    "kvconvert's modeling code",
)
