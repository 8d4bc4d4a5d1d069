"""Configuration of a kvconvert checkpoint whose attention a stock class cannot express.

Written next to ``modeling_kvconvert.py`` into converted checkpoints and loaded with
``trust_remote_code=True``. It describes a Llama-family decoder (RMSNorm, gated MLP, RoPE)
with two additions:

- ``num_key_value_heads`` is a list: KV heads of each layer (layers may differ);
- ``key_projection_heads`` is a list: for each layer, 0 for ordinary keys, or the number of
  key heads that ``k_proj`` produces before the post-RoPE projection down to that layer's KV
  heads (``key_down``, ``query_down`` weights; see the modeling file).

``base_model_type`` records the architecture the checkpoint was converted from.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class RefuseEngines:
    """Makes serving engines that cannot run this attention stop with the reason (vLLM, for one).

    Engines such as vLLM size their own KV cache from a model-wide head count that they look up
    under ``n_head_kv`` or ``num_kv_heads`` before ``num_key_value_heads``; transformers and
    this checkpoint's code never read those names. Answering them with the reason is how the
    checkpoint refuses to be run as some other model, instead of failing deep inside the engine.
    """

    @property
    def n_head_kv(self):
        what = []
        if len(set(self.num_key_value_heads)) > 1:
            what.append(f"a different number of KV heads per layer ({self.num_key_value_heads})")
        if any(self.key_projection_heads):
            what.append("keys projected after RoPE (key_down, query_down) inside attention")
        raise ValueError(
            "kvconvert checkpoint with its own attention: an engine that runs its own attention "
            "kernels and KV cache from one model-wide KV head count cannot serve it, because it "
            f"has {' and '.join(what) or 'kvconvert attention'}. Load it with transformers: "
            "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True); the model card "
            "says which engines serve it."
        )

    num_kv_heads = n_head_kv


class KVConvertConfig(RefuseEngines, PreTrainedConfig):
    """Llama-family decoder with per-layer KV heads and optional post-RoPE key projection."""

    model_type = "kvconvert"
    keys_to_ignore_at_inference = ["past_key_values"]

    base_model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: list[int] | int | None = None
    key_projection_heads: list[int] | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        n = self.num_hidden_layers
        kv = self.num_key_value_heads
        if kv is None:
            kv = self.num_attention_heads
        if isinstance(kv, int):
            kv = [kv] * n
        self.num_key_value_heads = [int(k) for k in kv]
        if self.key_projection_heads is None:
            self.key_projection_heads = [0] * n
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * n
        if not (len(self.num_key_value_heads) == len(self.key_projection_heads) == n):
            raise ValueError(
                "num_key_value_heads and key_projection_heads need one entry per layer"
            )
        heads = zip(self.num_key_value_heads, self.key_projection_heads, strict=True)
        for i, (g, p) in enumerate(heads):
            if g < 1 or self.num_attention_heads % g or (p and p % g):
                raise ValueError(f"layer {i}: {g} KV heads do not divide the heads evenly")
        super().__post_init__(**kwargs)


__all__ = ["KVConvertConfig"]
