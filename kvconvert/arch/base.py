"""What kvconvert needs to know about an attention layout, as data.

An adapter says where the q/k/v/o projections of layer ``i`` live in the checkpoint, how RoPE
pairs the dimensions of a head, and which config keys hold the head counts. Solvers and folders
never look at ``model_type``; they ask the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionAdapter:
    """Per-architecture facts for separate q/k/v/o projections (the Llama layout)."""

    name: str
    model_types: tuple[str, ...]
    layer_prefix: str = "model.layers.{i}."
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    #: "rotate_half" pairs dims (f, f + r/2); "interleaved" pairs (2f, 2f + 1); None: no RoPE.
    rope_layout: str | None = "rotate_half"
    #: config key holding the fraction of head dims that are rotary (absent: all of them).
    rotary_fraction_key: str | None = None
    #: which projections may carry a bias (read from the checkpoint when present).
    biases: tuple[str, ...] = ()
    #: checkpoint name of the token embedding, and module path of the model-level rotary
    #: embedding (used by the layer-sequential engine, which never builds the whole model).
    embed_tokens: str = "model.embed_tokens.weight"
    rotary_module: str = "model.rotary_emb"
    notes: str = ""

    # --- config facts -------------------------------------------------------------------
    def num_layers(self, config: dict[str, Any]) -> int:
        return int(config["num_hidden_layers"])

    def num_heads(self, config: dict[str, Any]) -> int:
        return int(config["num_attention_heads"])

    def num_kv_heads(self, config: dict[str, Any]) -> int:
        return int(config.get("num_key_value_heads") or self.num_heads(config))

    def head_dim(self, config: dict[str, Any]) -> int:
        hd = config.get("head_dim")
        return int(hd) if hd else int(config["hidden_size"]) // self.num_heads(config)

    def rotary_dim(self, config: dict[str, Any]) -> int:
        """Number of leading head dims that RoPE rotates (0 without RoPE)."""
        if self.rope_layout is None:
            return 0
        d = self.head_dim(config)
        frac = 1.0
        if self.rotary_fraction_key:
            frac = float(config.get(self.rotary_fraction_key, 1.0))
        rope = config.get("rope_parameters") or {}
        if isinstance(rope, dict) and "partial_rotary_factor" in rope:
            frac = float(rope["partial_rotary_factor"])
        r = int(d * frac)
        return r - (r % 2)

    def set_kv_heads(self, config: dict[str, Any], kv_heads: int) -> dict[str, Any]:
        """A copy of ``config`` declaring ``kv_heads`` KV heads; everything else verbatim."""
        out = dict(config)
        out["num_key_value_heads"] = int(kv_heads)
        return out

    # --- checkpoint names ---------------------------------------------------------------
    def tensor_name(self, layer: int, proj: str, kind: str = "weight") -> str:
        """Checkpoint name of ``proj`` (q/k/v/o) in ``layer``; kind "weight" or "bias"."""
        module = {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "o": self.o_proj}[proj]
        return f"{self.layer_prefix.format(i=layer)}{module}.{kind}"

    def module_name(self, layer: int, proj: str) -> str:
        """Name of the projection module inside the loaded ``*ForCausalLM`` (for hooks)."""
        return self.tensor_name(layer, proj).rsplit(".", 1)[0]

    def rope_pairs(self, config: dict[str, Any]) -> list[tuple[int, int]]:
        """(real, imaginary) dim index of each RoPE frequency pair of a head."""
        r = self.rotary_dim(config)
        if r == 0:
            return []
        if self.rope_layout == "rotate_half":
            return [(f, f + r // 2) for f in range(r // 2)]
        if self.rope_layout == "interleaved":
            return [(2 * f, 2 * f + 1) for f in range(r // 2)]
        raise ValueError(f"unknown RoPE layout {self.rope_layout!r}")
