"""OPT: separate q/k/v/out projections with biases, learned absolute positions, no RoPE, MHA.

Without RoPE every key dim gets the real merge, which folds exactly into ``q_proj``. The stock
``OPTForCausalLM`` has no GQA, so the output gets kvconvert's modeling code
(``modeling_kvconvert_opt.py``, loaded with ``trust_remote_code=True``); the weight names stay
the stock ones, only ``k_proj`` / ``v_proj`` shrink. ``--target pod`` keeps every head: the
stock class with PoD attention (``pod_models``).
"""

from ..modeling import RemoteFamily
from .base import AttentionAdapter

OPT = AttentionAdapter(
    name="opt",
    model_types=("opt",),
    layer_prefix="model.decoder.layers.{i}.",
    o_proj="self_attn.out_proj",
    rope_layout=None,
    biases=("q", "k", "v", "o"),
    outputs={"gqa": "kvconvert", "pod": "kvconvert"},
    remote_family=RemoteFamily(
        model_type="kvconvert_opt",
        config_class="KVConvertOPTConfig",
        model_class="KVConvertOPTModel",
        causal_lm_class="KVConvertOPTForCausalLM",
    ),
    pod_models={"opt": "OPT"},
    notes="separate q/k/v/out_proj with biases; absolute positions, no RoPE; GQA output "
    "through kvconvert's modeling code; PoD on the stock class",
)
