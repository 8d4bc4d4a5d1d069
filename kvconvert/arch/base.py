"""What kvconvert needs to know about an attention layout, as data.

An adapter says where the q/k/v/o projections of layer ``i`` live in the checkpoint (separate
or fused into one ``qkv_proj``), whether q/k pass a per-head norm before RoPE, how RoPE pairs
the dimensions of a head, and which config keys hold the head counts. Solvers, folders and the
pipeline never look at ``model_type``; they ask the adapter.

Tensors of one layer are addressed by *role*: ``"q.weight"``, ``"k.bias"``, ``"qkv.weight"``
(fused), ``"q_norm.weight"``... :meth:`AttentionAdapter.split` turns stored roles into the
separate q/k/v/o roles the solver works on, :meth:`AttentionAdapter.join` turns them back.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import KVConvertError
from ..modeling import RemoteFamily

PROJ_KEYS = ("q", "k", "v", "o")
KINDS = ("weight", "bias")


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
    #: fused q/k/v module, or None for separate projections; its row layout is ``qkv_layout``:
    #: "concat" = [q heads; k heads; v heads] (Phi-3), "per_head" = [q_h; k_h; v_h] for each
    #: head h (GPT-NeoX, which therefore cannot hold fewer KV heads than query heads).
    qkv_proj: str | None = None
    qkv_layout: str = "concat"
    #: weights stored (in_features, out_features), as GPT-2's ``Conv1D``: split / join
    #: transpose them to and from the torch ``Linear`` layout the solver works in.
    transposed: bool = False
    #: config keys under the architecture's own names (GPT-2: ``{"num_attention_heads":
    #: "n_head", ...}``); absent keys are read under the common name.
    config_keys: dict[str, str] = field(default_factory=dict)
    #: per-head RMSNorm applied to q and to k before RoPE (weight shape (head_dim,)), or None.
    q_norm: str | None = None
    k_norm: str | None = None
    #: what ``--target`` produces for this architecture: target -> output kind
    #: ("stock": the stock transformers class loads it, no remote code; "kvconvert": it loads
    #: with ``trust_remote_code=True``, kvconvert's model files written into it).
    outputs: dict[str, str] = field(default_factory=lambda: {"gqa": "stock"})
    #: the ``--target pod`` output class per model_type: absent = kvconvert's own Llama-layout
    #: PoD model (``KVConvertPodForCausalLM``, the stock Llama classes); X =
    #: ``KVConvertPod{X}ForCausalLM``, the stock class of this architecture with PoD
    #: attention (sliding-window layers keep their stock cache and own keys there).
    pod_models: dict[str, str] = field(default_factory=dict)
    #: the modeling code a ``--target gqa`` output gets when no stock class has GQA for this
    #: architecture (``outputs["gqa"] == "kvconvert"``), or None.
    remote_family: RemoteFamily | None = None
    #: whether kvconvert's Llama-family model code (``modeling_kvconvert.py``) reproduces this
    #: decoder (RMSNorm, gated MLP, RoPE): what per-layer KV heads, ``--rope-keys project`` and
    #: ``--refine-steps`` (which rebuilds a merged attention in-process) need.
    llama_decoder: bool = False
    #: checkpoint tensor name -> the name in the loaded model, where transformers renames it
    #: when loading the stock class (GPT-NeoX: ``embed_out`` -> ``lm_head``); remote code is
    #: loaded without such renames, so a remote-code output stores the loaded name.
    load_renames: dict[str, str] = field(default_factory=dict)
    #: checkpoint name of the token embedding, and module path of the model-level rotary
    #: embedding (used by the layer-sequential engine, which never builds the whole model).
    embed_tokens: str = "model.embed_tokens.weight"
    rotary_module: str = "model.rotary_emb"
    notes: str = ""

    # --- config facts -------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return self.config_keys.get(name, name)

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(config[self._key("num_hidden_layers")])

    def num_heads(self, config: dict[str, Any]) -> int:
        return int(config[self._key("num_attention_heads")])

    def num_kv_heads(self, config: dict[str, Any]) -> int:
        return int(config.get("num_key_value_heads") or self.num_heads(config))

    def head_dim(self, config: dict[str, Any]) -> int:
        hd = config.get("head_dim")
        return int(hd) if hd else int(config[self._key("hidden_size")]) // self.num_heads(config)

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
    def for_checkpoint(self, names: Container[str]) -> AttentionAdapter:
        """This adapter, with tensor names as a checkpoint holding ``names`` stores them.

        Some checkpoints were saved from the bare base model and lack the first component of
        ``layer_prefix`` (openai-community/gpt2 stores ``h.0.attn...``, not
        ``transformer.h.0.attn...``); transformers loads both, and so does kvconvert. Module
        names (for hooks on the loaded ``*ForCausalLM``) keep the full prefix.
        """
        if self.tensor_name(0, "k") in names:
            return self
        bare = replace(self, layer_prefix=self.layer_prefix.split(".", 1)[1])
        return bare if bare.tensor_name(0, "k") in names else self

    def output_adapter(self) -> AttentionAdapter:
        """The adapter of the ``--target gqa`` output's layout: this one, or the remote family's
        (e.g. GPT-NeoX's fused per-head qkv is written as separate q/k/v projections)."""
        if self.remote_family is None or not self.remote_family.layout:
            return self
        return replace(self, **self.remote_family.layout)

    @property
    def has_qk_norm(self) -> bool:
        return self.k_norm is not None

    def _module(self, proj: str) -> str:
        if self.qkv_proj and proj in ("q", "k", "v", "qkv"):
            return self.qkv_proj
        return {
            "q": self.q_proj,
            "k": self.k_proj,
            "v": self.v_proj,
            "o": self.o_proj,
            "q_norm": self.q_norm,
            "k_norm": self.k_norm,
        }[proj]

    def tensor_name(self, layer: int, proj: str, kind: str = "weight") -> str:
        """Checkpoint name of ``proj`` (q/k/v/o; the fused tensor when fused) in ``layer``."""
        return f"{self.layer_prefix.format(i=layer)}{self._module(proj)}.{kind}"

    def module_name(self, layer: int, proj: str) -> str:
        """Name of the projection module inside the loaded ``*ForCausalLM`` (for hooks)."""
        return self.tensor_name(layer, proj).rsplit(".", 1)[0]

    def layer_tensor_names(self, layer: int) -> dict[str, str]:
        """role -> checkpoint name of every attention tensor the layer may store."""
        projs = ("qkv", "o") if self.qkv_proj else PROJ_KEYS
        out = {f"{p}.{k}": self.tensor_name(layer, p, k) for p in projs for k in KINDS}
        for n in ("q_norm", "k_norm"):
            if getattr(self, n):
                out[f"{n}.weight"] = self.tensor_name(layer, n)
        return out

    def split(
        self, stored: dict[str, torch.Tensor | None], num_heads: int, head_dim: int
    ) -> dict[str, torch.Tensor | None]:
        """Stored roles -> separate q/k/v/o roles (a fused qkv is cut into its three parts)."""
        out = self._transpose(stored)
        if self.qkv_proj:
            for kind in KINDS:
                fused = out.pop(f"qkv.{kind}", None)
                parts = (
                    split_qkv(fused, num_heads, head_dim, layout=self.qkv_layout)
                    if fused is not None
                    else (None,) * 3
                )
                out.update({f"{p}.{kind}": t for p, t in zip("qkv", parts, strict=True)})
        return out

    def join(
        self, items: dict[str, torch.Tensor | None], head_dim: int
    ) -> dict[str, torch.Tensor | None]:
        """Separate q/k/v/o roles -> stored roles (re-fuses qkv): the inverse of :meth:`split`."""
        out = dict(items)
        if self.qkv_proj:
            for kind in KINDS:
                q, k, v = (out.pop(f"{p}.{kind}", None) for p in "qkv")
                out[f"qkv.{kind}"] = (
                    None if q is None else fuse_qkv(q, k, v, head_dim, self.qkv_layout)
                )
        return self._transpose(out)

    def _transpose(self, items: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Projection weights between the stored layout and torch's (out, in) (``transposed``)."""
        if not self.transposed:
            return dict(items)
        return {
            role: t.T.contiguous() if t is not None and t.dim() == 2 else t
            for role, t in items.items()
        }

    def split_activation(
        self, module_role: str, out: torch.Tensor, num_heads: int, head_dim: int
    ) -> dict[str, torch.Tensor]:
        """A hooked module's output -> {"q"/"k"/"v": activations (..., heads*head_dim)}."""
        if module_role != "qkv":
            return {module_role: out}
        q, k, v = split_qkv(out, num_heads, head_dim, dim=-1, layout=self.qkv_layout)
        return {"q": q, "k": k, "v": v}

    def stat_modules(self, layer: int) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Modules whose outputs are the activations to merge.

        name -> (module role, which of q/k/v to take from it). With per-head q/k norms, q and
        k are taken after the norm (what RoPE sees) and v from its projection.
        """
        qkv = ("q", "k", "v")
        if self.qkv_proj:
            mods = {self.module_name(layer, "qkv"): ("qkv", qkv)}
        else:
            mods = {self.module_name(layer, p): (p, (p,)) for p in qkv}
        if self.has_qk_norm:
            for name, (role, take) in list(mods.items()):
                mods[name] = (role, tuple(p for p in take if p == "v"))
            mods[self.module_name(layer, "q_norm")] = ("q", ("q",))
            mods[self.module_name(layer, "k_norm")] = ("k", ("k",))
        return {n: v for n, v in mods.items() if v[1]}

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


def split_qkv(
    t: torch.Tensor, num_heads: int, head_dim: int, dim: int = 0, layout: str = "concat"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut a fused q/k/v tensor along ``dim`` (rows of a weight, or the last dim of an
    activation); with ``concat`` the KV head count is read from its size."""
    size, q = t.shape[dim], num_heads * head_dim
    if layout == "per_head":
        if size != 3 * q:
            raise ValueError(f"fused per-head qkv of size {size} does not fit {num_heads} heads")
        dim = dim % t.dim()
        per = t.unflatten(dim, (num_heads, 3, head_dim))
        parts = per.unbind(dim + 1)  # each (..., heads, head_dim, ...)
        return tuple(x.flatten(dim, dim + 1) for x in parts)  # type: ignore[return-value]
    kv = (size - q) // 2
    if kv <= 0 or q + 2 * kv != size or kv % head_dim:
        raise ValueError(f"fused qkv of size {size} does not fit {num_heads} heads")
    return tuple(torch.split(t, [q, kv, kv], dim=dim))  # type: ignore[return-value]


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, layout: str = "concat"
) -> torch.Tensor:
    """Inverse of :func:`split_qkv` for weights and biases (rows)."""
    if layout == "concat":
        return torch.cat([q, k, v], dim=0)
    if k.shape[0] != q.shape[0]:
        raise KVConvertError(
            "a fused per-head qkv (GPT-NeoX layout) cannot hold fewer KV heads than query "
            "heads; this architecture's GQA output needs kvconvert's modeling code"
        )
    per = torch.stack([x.unflatten(0, (-1, head_dim)) for x in (q, k, v)], dim=1)
    return per.flatten(0, 2)
