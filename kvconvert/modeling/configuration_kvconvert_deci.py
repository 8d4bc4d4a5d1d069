"""Configuration of a kvconvert checkpoint in the DeciLM / Nemotron-NAS layout.

Written next to ``modeling_kvconvert_deci.py`` into converted checkpoints and loaded with
``trust_remote_code=True``. The layout is the one serving engines already read
(``"architectures": ["DeciLMForCausalLM"]``, ``"model_type": "nemotron-nas"``): a Llama
config plus ``block_configs``, one entry per layer::

    {"attention": {"n_heads_in_group": 3, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": 4.0, "no_op": false, "replace_with_linear": false}}

Layer i keeps ``num_attention_heads // n_heads_in_group`` KV heads; its MLP width is
``ffn.intermediate_size`` when given, else ``int(2 * ffn_mult * hidden_size / 3)`` rounded up
to a multiple of 256 (the rule llama.cpp and vLLM apply). Engines read the entries as
attributes (``block.attention.n_heads_in_group``), so each entry is a dict whose keys also
read as attributes; it is saved back as plain JSON.
"""

from __future__ import annotations

from transformers import LlamaConfig


class Section(dict):
    """A JSON object whose keys also read as attributes (``block.ffn.ffn_mult``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """MLP width of a block with ``ffn_mult``: 2/3 of mult x hidden, rounded up to 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


class KVConvertDeciConfig(LlamaConfig):
    """A Llama decoder whose layers keep different numbers of KV heads (``block_configs``)."""

    model_type = "nemotron-nas"

    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        blocks = self.block_configs
        if blocks is None:
            blocks = [{"attention": {"n_heads_in_group": 1}, "ffn": {}}] * n
        if len(blocks) != n:
            raise ValueError(f"block_configs has {len(blocks)} entries for {n} layers")
        self.block_configs = [
            Section(attention=Section(b["attention"]), ffn=Section(b["ffn"])) for b in blocks
        ]
        for i, block in enumerate(self.block_configs):
            att, ffn = block.attention, block.ffn
            if any(s.get(k) for s in (att, ffn) for k in ("no_op", "replace_with_linear")):
                raise ValueError(f"layer {i}: no-op and linear blocks are not implemented here")
            group = att.get("n_heads_in_group")
            if not isinstance(group, int) or group < 1 or self.num_attention_heads % group:
                raise ValueError(
                    f"layer {i}: n_heads_in_group {group!r} does not divide the "
                    f"{self.num_attention_heads} attention heads"
                )
        super().__post_init__(**kwargs)

    def kv_heads(self, layer: int) -> int:
        """KV heads of ``layer``."""
        group = self.block_configs[layer].attention.n_heads_in_group
        return self.num_attention_heads // group

    def mlp_width(self, layer: int) -> int:
        """MLP width of ``layer``: the block's ``intermediate_size``, else from ``ffn_mult``."""
        ffn = self.block_configs[layer].ffn
        if ffn.get("intermediate_size"):
            return int(ffn.intermediate_size)
        if ffn.get("ffn_mult") is not None:
            return ffn_mult_to_intermediate_size(ffn.ffn_mult, self.hidden_size)
        return self.intermediate_size


__all__ = ["KVConvertDeciConfig"]
