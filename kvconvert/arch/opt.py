"""OPT: separate q/k/v/out projections with biases, learned absolute positions, no RoPE, MHA.

Without RoPE every key dim gets the real merge, which folds exactly into ``q_proj``. The stock
``OPTForCausalLM`` has no GQA, so a merged output needs kvconvert's own modeling code, which is
not part of this adapter yet (``convert`` refuses ``--target gqa``, ``inspect`` describes
it). ``--target pod`` keeps every head: the stock class with PoD attention (``pod_models``).
"""

from .base import AttentionAdapter

OPT = AttentionAdapter(
    name="opt",
    model_types=("opt",),
    layer_prefix="model.decoder.layers.{i}.",
    o_proj="self_attn.out_proj",
    rope_layout=None,
    biases=("q", "k", "v", "o"),
    outputs={"pod": "kvconvert"},
    pod_models={"opt": "OPT"},
    notes="separate q/k/v/out_proj with biases; absolute positions, no RoPE; GQA output waits "
    "for kvconvert's modeling code",
)
