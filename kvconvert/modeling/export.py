"""Turn a source config into the remote-code config, and put the model files into an output.

Lives beside the model files but is not copied: only the ``configuration_*.py`` and
``modeling_*.py`` files go into checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from . import AUTO_MAP, DECI_AUTO_MAP, FILES, FOLDER, RemoteFamily

_DROP = ("architectures", "auto_map", "attention_bias", "model_type", "use_sliding_window")


def layer_types(config: dict[str, Any]) -> list[str]:
    """Per-layer attention kind as the source model applies it."""
    n = int(config["num_hidden_layers"])
    if config.get("layer_types"):
        return list(config["layer_types"])
    if config.get("use_sliding_window") is False or not config.get("sliding_window"):
        return ["full_attention"] * n
    return ["sliding_attention"] * n


def remote_config(
    config: dict[str, Any],
    kv_heads: list[int],
    key_projection_heads: list[int],
    biases: dict[str, bool],
) -> dict[str, Any]:
    """config.json for a KVConvertForCausalLM converted from ``config`` (a source config dict).

    Everything the source declares is kept (rope settings, token ids, dtype...); the model
    type becomes ``kvconvert`` with the source's recorded in ``base_model_type``.
    """
    out = {k: v for k, v in config.items() if k not in _DROP}
    types = layer_types(config)
    if "sliding_attention" not in types:
        out["sliding_window"] = None
    out.update(
        model_type="kvconvert",
        base_model_type=config.get("model_type"),
        architectures=["KVConvertForCausalLM"],
        auto_map=dict(AUTO_MAP),
        num_key_value_heads=[int(k) for k in kv_heads],
        key_projection_heads=[int(p) for p in key_projection_heads],
        layer_types=types,
        **{f"{p}_bias": bool(biases.get(p, False)) for p in "qkvo"},
    )
    return out


#: RoPE kinds llama.cpp's DeciLM converter carries over (it writes llama3 frequency factors
#: and ignores any other scaling)
DECI_ROPE_TYPES = (None, "default", "llama3")


def deci_unfit(
    config: dict[str, Any], biases: dict[str, bool], projected: bool, llama_decoder: bool
) -> str | None:
    """Why an output of the source ``config`` cannot take the DeciLM / Nemotron-NAS layout
    (one line), or None when it can. The layout is a Llama decoder without biases whose MLP
    width is ``ffn_mult``'s rounding rule and whose key length is hidden_size / heads (what
    llama.cpp's converter assumes)."""
    if not llama_decoder:  # the architecture adapter's fact (kvconvert.arch)
        return f"the DeciLM layout is a Llama decoder; this model is {config.get('model_type')!r}"
    if projected:
        return "--rope-keys project has no DeciLM equivalent"
    with_bias = [p for p in "qkvo" if biases.get(p)] + (["mlp"] if config.get("mlp_bias") else [])
    if with_bias:
        return f"the DeciLM layout has no biases; this model has {', '.join(with_bias)} biases"
    if "sliding_attention" in layer_types(config):
        return "the DeciLM layout has no sliding-window layers"
    if config.get("hidden_act", "silu") != "silu":
        return f"the DeciLM layout uses SiLU; this model uses {config.get('hidden_act')!r}"
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden:
        return (
            f"head_dim {head_dim} x {heads} heads is not hidden_size {hidden} (llama.cpp "
            "derives the DeciLM key length from hidden_size / heads)"
        )
    from .configuration_kvconvert_deci import ffn_mult_to_intermediate_size

    width = int(config["intermediate_size"])
    if ffn_mult_to_intermediate_size(ffn_mult(config), hidden) != width:
        return (
            f"the MLP width {width} is not a multiple of 256, so DeciLM's ffn_mult cannot "
            "express it"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) not in DECI_ROPE_TYPES:
        return f"llama.cpp's DeciLM converter drops {rope.get('rope_type')!r} RoPE scaling"
    return None


def ffn_mult(config: dict[str, Any]) -> float:
    """DeciLM's MLP multiplier for the source's width: width = 2/3 x mult x hidden."""
    return 3 * int(config["intermediate_size"]) / (2 * int(config["hidden_size"]))


def deci_config(config: dict[str, Any], kv_heads: list[int]) -> dict[str, Any]:
    """config.json in the DeciLM / Nemotron-NAS layout for a Llama ``config`` whose layers keep
    ``kv_heads``: the source's keys (rope, token ids, sizes) plus one ``block_configs`` entry
    per layer. Call :func:`deci_unfit` first."""
    drop = (*_DROP, "num_key_value_heads", "sliding_window", "max_window_layers", "layer_types")
    out = {k: v for k, v in config.items() if k not in drop}
    heads, mult = int(config["num_attention_heads"]), ffn_mult(config)
    out.update(
        model_type="nemotron-nas",
        architectures=["DeciLMForCausalLM"],
        auto_map=dict(DECI_AUTO_MAP),
        block_configs=[
            {
                "attention": {
                    "n_heads_in_group": heads // int(g),
                    "no_op": False,
                    "replace_with_linear": False,
                },
                "ffn": {"ffn_mult": mult, "no_op": False, "replace_with_linear": False},
            }
            for g in kv_heads
        ],
    )
    return out


def family_config(config: dict[str, Any], family: RemoteFamily, kv_heads: int) -> dict[str, Any]:
    """config.json for ``family``'s GQA model converted from ``config`` (a source config dict):
    the source's keys verbatim plus ``num_key_value_heads``, under the family's model type."""
    out = {k: v for k, v in config.items() if k not in ("architectures", "auto_map")}
    out.update(
        model_type=family.model_type,
        architectures=[family.causal_lm_class],
        auto_map=family.auto_map,
        num_key_value_heads=int(kv_heads),
    )
    return out


def copy_model_files(folder: Path, files: tuple[str, ...] = FILES) -> list[str]:
    for name in files:
        shutil.copy2(FOLDER / name, folder / name)
    return list(files)


def attention_module(
    config: dict[str, Any],
    layer: int,
    tensors: dict[str, Any],
    attn_implementation: str | None,
):
    """A KVConvertAttention for ``layer`` holding ``tensors`` (q/k/v/o weights, biases, and
    key_down/query_down), configured by a remote ``config`` dict; used in-process to measure a
    merged layer inside the calibration model (the stock decoder layer calls it the same way).
    """
    import torch

    from .configuration_kvconvert import KVConvertConfig
    from .modeling_kvconvert import KVConvertAttention

    cfg = KVConvertConfig(**{k: v for k, v in config.items() if k != "auto_map"})
    cfg._attn_implementation = attn_implementation
    attn = KVConvertAttention(cfg, layer)
    params = dict(attn.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                params[name].copy_(value)
    return attn
