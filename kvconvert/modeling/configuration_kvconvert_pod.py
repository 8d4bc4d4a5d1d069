"""Configuration of a PoD checkpoint (proximal tokens over distant tokens, layer key sharing).

A Llama-layout decoder (llama, mistral, qwen2) whose layers share the keys of *distant* tokens
within blocks of consecutive layers, per KV head. Written by kvconvert; stands alone (only
transformers is needed to load it with ``trust_remote_code=True``).

PoD fields:

- ``pod_sink`` (n_s): the first n_s tokens of a sequence are always proximal.
- ``pod_recent`` (n_r): a key is proximal to a query when it is at most n_r positions before it.
- ``pod_map``: ``pod_map[layer][kv_head]`` is the layer whose keys that head uses for distant
  tokens (the bottom of its block). ``pod_map[l][h] == l`` means the head keeps its own keys
  everywhere. ``None`` means every layer is its own block (the original model).
"""

from transformers import PreTrainedConfig


class KVConvertPodConfig(PreTrainedConfig):
    model_type = "kvconvert_pod"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
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
    attention_dropout: float | int = 0.0
    #: bias on q/k/v projections (qwen2; llama with attention_bias) and on o_proj (llama only).
    attention_qkv_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    #: sliding-window attention as the source had it (mistral, qwen2 with use_sliding_window).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    pod_sink: int = 16
    pod_recent: int = 4080
    pod_map: list[list[int]] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if self.pod_map is None:
            self.pod_map = [[i] * self.num_key_value_heads for i in range(self.num_hidden_layers)]
        super().__post_init__(**kwargs)
        check_pod_map(self.pod_map, self.num_hidden_layers, self.num_key_value_heads)
        if self.pod_sink < 0 or self.pod_recent < 0:
            raise ValueError("pod_sink and pod_recent must be >= 0")


def check_pod_map(pod_map: list[list[int]], num_layers: int, num_kv_heads: int) -> None:
    """A valid map: one row per layer, one entry per KV head, blocks of consecutive layers."""
    if len(pod_map) != num_layers or any(len(row) != num_kv_heads for row in pod_map):
        raise ValueError(f"pod_map must be {num_layers} rows of {num_kv_heads} layer indices")
    for layer, row in enumerate(pod_map):
        for head, bottom in enumerate(row):
            if not 0 <= bottom <= layer:
                raise ValueError(f"pod_map[{layer}][{head}] = {bottom} is not a layer <= {layer}")
            if any(pod_map[k][head] != bottom for k in range(bottom, layer + 1)):
                raise ValueError(
                    f"pod_map[{layer}][{head}] = {bottom}: layers {bottom}..{layer} must all "
                    f"use layer {bottom} for head {head} (blocks are consecutive layers)"
                )


__all__ = ["KVConvertPodConfig"]
