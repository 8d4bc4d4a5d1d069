"""GPT-2: q/k/v fused in ``attn.c_attn``, a ``Conv1D`` (weights stored transposed, (in, out)),
output columns [q heads | k heads | v heads]; learned absolute positions, no RoPE, MHA.

The fused tensor is transposed and cut into q/k/v for solving, and written back fused with
(H + 2*KV) * d columns. Without RoPE every key dim gets the real merge, which folds exactly into
the query. The stock ``GPT2LMHeadModel`` splits ``c_attn`` in three equal parts and has no GQA,
so the output gets kvconvert's modeling code (``modeling_kvconvert_gpt2.py``, loaded with
``trust_remote_code=True``); the weight names stay the stock ones.
"""

from ..modeling import RemoteFamily
from .base import AttentionAdapter

GPT2 = AttentionAdapter(
    name="gpt2",
    model_types=("gpt2",),
    layer_prefix="transformer.h.{i}.",
    o_proj="attn.c_proj",
    qkv_proj="attn.c_attn",
    qkv_layout="concat",
    transposed=True,
    rope_layout=None,
    biases=("q", "k", "v", "o"),
    config_keys={
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "hidden_size": "n_embd",
    },
    outputs={"gqa": "kvconvert"},
    remote_family=RemoteFamily(
        model_type="kvconvert_gpt2",
        config_class="KVConvertGPT2Config",
        model_class="KVConvertGPT2Model",
        causal_lm_class="KVConvertGPT2LMHeadModel",
    ),
    notes="fused Conv1D c_attn (transposed) [q | k | v]; absolute positions, no RoPE; GQA "
    "output through kvconvert's modeling code",
)
