"""GPT-NeoX (Pythia): q/k/v fused in ``attention.query_key_value`` and interleaved per head.

Rows are [q_h; k_h; v_h] for each head h, so the fused tensor cannot hold fewer KV heads than
query heads, and transformers' GPT-NeoX has no GQA: the output gets kvconvert's modeling code
(``modeling_kvconvert_gpt_neox.py``, loaded with ``trust_remote_code=True``), which stores
q/k/v as separate ``attention.q_proj`` / ``k_proj`` / ``v_proj``. RoPE is ``rotate_half`` over
the first ``rotary_pct`` of each head; the other dims get the real merge. ``--target pod``
keeps every head, so its output is the stock class with PoD attention (``pod_models``).
"""

from ..modeling import RemoteFamily
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
    outputs={"gqa": "kvconvert", "pod": "kvconvert"},
    remote_family=RemoteFamily(
        model_type="kvconvert_gpt_neox",
        config_class="KVConvertGPTNeoXConfig",
        model_class="KVConvertGPTNeoXModel",
        causal_lm_class="KVConvertGPTNeoXForCausalLM",
        layout={
            "qkv_proj": None,
            "q_proj": "attention.q_proj",
            "k_proj": "attention.k_proj",
            "v_proj": "attention.v_proj",
        },
    ),
    pod_models={"gpt_neox": "GPTNeoX"},
    # Pythia stores the LM head as ``embed_out``; only the stock loader renames it, so the
    # remote-code outputs (GQA and PoD) store it under the loaded name.
    load_renames={"embed_out.weight": "lm_head.weight"},
    notes="fused qkv interleaved per head, written as separate q/k/v_proj; partial rotary "
    "(rotary_pct); GQA output through kvconvert's modeling code; PoD on the stock class",
)
