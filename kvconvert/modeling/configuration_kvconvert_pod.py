"""Configuration of a PoD checkpoint (proximal tokens over distant tokens, layer key sharing).

PoD fields, the same for every architecture:

- ``pod_sink`` (n_s): the first n_s tokens of a sequence are always proximal.
- ``pod_recent`` (n_r): a key is proximal to a query when it is at most n_r positions before it.
- ``pod_map``: ``pod_map[layer][kv_head]`` is the layer whose keys that head uses for distant
  tokens (the bottom of its block). ``pod_map[l][h] == l`` means the head keeps its own keys
  everywhere. ``None`` means every layer is its own block (the original model).
- ``pod_distant_bias``: ``pod_distant_bias[layer][kv_head]`` is added to the attention logits
  of the distant tokens a borrowing head scores with its block bottom's keys (0 where the head
  keeps its own keys). A negative bias makes a head lean on its own proximal keys where the
  borrowed ones mislead it. ``None``: no bias.

``KVConvertPodConfig`` describes Llama-layout sources (llama, mistral, qwen2) with resolved
RoPE, bias and sliding-window facts; the ``KVConvertPod<Arch>Config`` classes (each in
``configuration_kvconvert_pod_<arch>.py``, which an output of that architecture carries too)
are the stock config of their architecture (every key of the source kept verbatim) plus
``PodConfigMixin``. There, sliding-window layers keep the stock sliding cache and their own
keys; a block is a run of consecutive full-attention layers (sliding layers in between are
skipped). This file names no architecture. Written by kvconvert; stands alone (only
transformers is needed to load it with ``trust_remote_code=True``).
"""

from dataclasses import dataclass

from transformers import PreTrainedConfig

#: why a serving engine must not run this checkpoint with its own attention (see ``n_head_kv``)
ENGINE_REFUSAL = (
    "kvconvert PoD checkpoint: an engine that runs its own attention kernels and KV cache from "
    "one model-wide KV head count cannot serve it. For distant tokens its upper layers attend "
    "with the keys of their block's bottom layer (pod_map), which only the checkpoint's own "
    "model code and PodCache compute; such an engine would run the dense original model "
    "instead. Load it with transformers: AutoModelForCausalLM.from_pretrained(path, "
    "trust_remote_code=True); the model card says which engines serve it."
)


class RefuseEngines:
    """Makes serving engines that cannot run PoD stop with the reason (vLLM, for one).

    Engines such as vLLM size their own KV cache from a model-wide head count that they look up
    under ``n_head_kv`` or ``num_kv_heads`` before ``num_key_value_heads``; transformers and
    this checkpoint's code never read those names. Answering them with the reason is how the
    checkpoint refuses to be served as a dense model, instead of failing deep inside the engine.
    """

    @property
    def n_head_kv(self):
        raise ValueError(ENGINE_REFUSAL)

    num_kv_heads = n_head_kv


class KVConvertPodConfig(RefuseEngines, PreTrainedConfig):
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
    #: what the stock Llama attention builds its four projections with (= attention_qkv_bias;
    #: o_proj is rebuilt where attention_out_bias differs)
    attention_bias: bool | None = None
    mlp_bias: bool = False
    #: sliding-window attention as the source had it (mistral, qwen2 with use_sliding_window).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    pod_sink: int = 16
    pod_recent: int = 4080
    pod_map: list[list[int]] | None = None
    pod_distant_bias: list[list[float]] | None = None

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
        if self.attention_bias is None:
            self.attention_bias = self.attention_qkv_bias
        super().__post_init__(**kwargs)
        check_pod_map(self.pod_map, self.num_hidden_layers, self.num_key_value_heads)
        check_pod_bias(self.pod_distant_bias, self.pod_map)
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


def check_pod_bias(bias: list[list[float]] | None, pod_map: list[list[int]]) -> None:
    """A valid distant bias: None, or a finite number per (layer, KV head), 0 where the head
    keeps its own keys (only borrowed keys are biased)."""
    if bias is None:
        return
    if len(bias) != len(pod_map) or any(
        len(b) != len(m) for b, m in zip(bias, pod_map, strict=False)
    ):
        raise ValueError(
            f"pod_distant_bias must be {len(pod_map)} rows of {len(pod_map[0])} numbers "
            "(one per layer and KV head, like pod_map)"
        )
    for layer, row in enumerate(bias):
        for head, b in enumerate(row):
            if not isinstance(b, int | float) or b != b or abs(b) == float("inf"):
                raise ValueError(f"pod_distant_bias[{layer}][{head}] = {b!r} is not a number")
            if b != 0 and pod_map[layer][head] == layer:
                raise ValueError(
                    f"pod_distant_bias[{layer}][{head}] = {b}: layer {layer} keeps its own keys "
                    f"for head {head}, only borrowed keys take a bias"
                )


def sliding_windows(config) -> list[int | None]:
    """Per layer, the sliding window the stock model applies there (None: full attention).

    ``layer_types`` when the config has them (gemma2, qwen3), else the stock rule of configs
    without them (phi3): ``sliding_window`` set means every layer slides.
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * config.num_hidden_layers


def kv_heads(config) -> int:
    """KV heads per layer: ``num_key_value_heads``, or every query head in MHA-only configs
    (GPT-NeoX, OPT) that do not declare it."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_pod_config(config) -> None:
    """Fill the identity map when absent; refuse a map the PoD cache cannot hold."""
    layers, kv = config.num_hidden_layers, kv_heads(config)
    if config.pod_map is None:
        config.pod_map = [[i] * kv for i in range(layers)]
    pod_map, windows = config.pod_map, sliding_windows(config)
    if len(pod_map) != layers or any(len(row) != kv for row in pod_map):
        raise ValueError(f"pod_map must be {layers} rows of {kv} layer indices")
    full = [i for i, w in enumerate(windows) if w is None]
    for layer, row in enumerate(pod_map):
        for head, bottom in enumerate(row):
            if windows[layer] is not None and bottom != layer:
                raise ValueError(
                    f"pod_map[{layer}][{head}] = {bottom}: layer {layer} is a sliding-window "
                    "layer, it keeps its own keys"
                )
            if bottom == layer:
                continue
            if not 0 <= bottom < layer or windows[bottom] is not None:
                raise ValueError(
                    f"pod_map[{layer}][{head}] = {bottom} is not a full-attention layer <= {layer}"
                )
            if any(pod_map[k][head] != bottom for k in full if bottom <= k <= layer):
                raise ValueError(
                    f"pod_map[{layer}][{head}] = {bottom}: the full-attention layers {bottom}.."
                    f"{layer} must all use layer {bottom} for head {head} (blocks are runs of "
                    "consecutive layers)"
                )
    check_pod_bias(config.pod_distant_bias, pod_map)
    if config.pod_sink < 0 or config.pod_recent < 0:
        raise ValueError("pod_sink and pod_recent must be >= 0")


@dataclass
class PodConfigMixin(RefuseEngines):
    """The PoD fields every architecture's config adds to its stock config, checked on load.

    A dataclass, so that its fields join the subclass's config fields (saved by ``to_dict``
    with their defaults), as fields declared on the subclass itself would.
    """

    pod_sink: int = 16
    pod_recent: int = 4080
    pod_map: list[list[int]] | None = None
    pod_distant_bias: list[list[float]] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_pod_config(self)


__all__ = ["KVConvertPodConfig", "PodConfigMixin", "sliding_windows"]
