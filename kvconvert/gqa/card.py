"""README.md model card of a GQA output: the merged heads, how its layout loads, which
serving engines run it (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import card as card_mod
from ..recipe import Recipe
from ..report import base_model_id, source_card_metadata, without_local_paths, write_recipe

#: Which serving engines run each kind of GQA output (docs/serving.md has the measurements).
SERVING = {
    "stock": "vLLM, SGLang and llama.cpp serve it as the source architecture.",
    "deci": "vLLM serves it as `DeciLMForCausalLM` (`vllm serve FOLDER --trust-remote-code`); "
    "llama.cpp's "
    "converter writes a `deci` GGUF with per-layer KV heads (run it with flash attention on).",
    "family": "vLLM serves it through its Transformers backend (`vllm serve FOLDER "
    "--trust-remote-code`); llama.cpp has no grouped-query attention for this architecture.",
    "kvconvert": "Only transformers runs it: its attention is kvconvert's own model code, which "
    "engines that bring their own attention kernels and KV cache cannot run. vLLM stops at "
    "start-up with that reason rather than serve a different model. For vLLM or llama.cpp, "
    "convert to the DeciLM layout instead (`--format auto`, without `--rope-keys project`).",
}
#: "How to load", by whether the checkpoint is the stock architecture, ships its own model
#: code, or is in the DeciLM layout.
LOAD_INTRO = {
    "stock": "An ordinary grouped-query-attention checkpoint of the source architecture: the "
    "stock transformers classes, vLLM, TGI and other GQA-aware stacks load it as-is, no remote "
    "code:",
    "remote": "This checkpoint ships its own modeling code (`auto_map` in `config.json`); load "
    "it with `trust_remote_code=True` (transformers 5):",
    "deci": "The layers keep different numbers of KV heads, in the DeciLM / Nemotron-NAS layout "
    "(`DeciLMForCausalLM`, `block_configs` in `config.json`) that serving engines read "
    "(below). For transformers the checkpoint ships its own modeling code (thin, on "
    "the stock Llama classes); load it with `trust_remote_code=True` (transformers 5):",
}


def model_card(
    report: dict[str, Any],
    base_model: str | None,
    *,
    source_card: dict[str, Any] | None = None,
    remote_code: bool = False,
    recipe_yaml: str | None = None,
) -> str:
    """The card of a GQA output (``remote_code``: it needs ``trust_remote_code=True``)."""
    src, tgt = report["source"], report["target"]
    deci = tgt.get("format") == "deci"
    intro = LOAD_INTRO["deci" if deci else "remote" if remote_code else "stock"]
    origin = (
        f"[`{base_model}`](https://huggingface.co/{base_model})"
        if base_model
        else f"`{src['model']}`"
    )
    parts = card_mod.CardParts(
        title=f": {headline(src, tgt)}",
        body=[
            f"Converted from {origin} by kvconvert "
            f"{report.get('versions', {}).get('kvconvert', '')} to shrink the KV cache.",
            "",
            "## What was done",
            "",
            *what_was_done(report),
        ],
        how_to_load=card_mod.load_lines(intro, remote_code or deci),
        serving=serving(tgt),
        footer=("Per-layer details (groups, errors, timings) are in `kvconvert.json`.", ""),
    )
    return card_mod.model_card(report, base_model, parts, source_card, recipe_yaml)


def write_recipe_and_card(
    work: Path, recipe: Recipe, report: dict[str, Any], source: Path, config: dict[str, Any]
) -> None:
    """``recipe.yaml`` (see ``report.write_recipe``) and the ``README.md`` model card."""
    text = write_recipe(work, recipe, report, source)
    card = model_card(
        report,
        base_model_id(recipe, config),  # the source's keys, _name_or_path included
        source_card=source_card_metadata(source),
        remote_code="auto_map" in config,
        recipe_yaml=text,
    )
    (work / "README.md").write_text(without_local_paths(card, recipe, report))


def heads(value: Any) -> str:
    """Per-layer head counts as 4/2/2, or one number where every layer has it."""
    if isinstance(value, list):
        return "/".join(map(str, value)) if len(set(value)) > 1 else str(value[0])
    return str(value)


def headline(src: dict[str, Any], tgt: dict[str, Any]) -> str:
    if "num_key_value_heads" in tgt:
        return f"{heads(tgt['num_key_value_heads'])} KV heads (from {src['num_key_value_heads']})"
    return "KV-head merging"


def what_was_done(report: dict[str, Any]) -> list[str]:
    """The card's list of what the conversion did and what it cost."""
    src, tgt, recipe = report["source"], report["target"], report["recipe"]
    out = ["- Method: KV-head merging (`--target gqa`)."]
    if "num_key_value_heads" in tgt:
        out.append(
            f"- KV heads per layer: {src['num_key_value_heads']} -> "
            f"{heads(tgt['num_key_value_heads'])} (of {src['num_attention_heads']} query heads, "
            f"{src['num_layers']} layers); merge `{recipe.get('method')}`, RoPE keys "
            f"`{recipe.get('rope_keys')}`, objective `{recipe.get('objective')}`, grouping "
            f"`{recipe.get('grouping')}`."
        )
    for key, value in tgt.items():
        if key not in ("kind", "num_key_value_heads") and not isinstance(value, (dict, list)):
            out.append(f"- {key.replace('_', ' ')}: `{value}`")
    kvb = report.get("kv_bytes_per_token")
    if kvb and kvb.get("before"):
        saving = 1 - kvb["after"] / kvb["before"]
        out.append(
            f"- KV cache per token ({kvb.get('dtype', '')}): {kvb['before']:,} bytes -> "
            f"{kvb['after']:,} bytes ({saving:.0%} smaller)."
        )
    cal = report.get("calibration")
    if cal:
        size = f", {cal['sequences']} x {cal['seq_len']} tokens" if cal.get("sequences") else ""
        out.append(f"- Calibration: {cal['source']}{size}.")
    layers = [r for r in report.get("layers", []) if "key_error" in r]
    if layers:
        k = [r["key_error"] for r in layers]
        v = [r["value_error"] for r in layers]
        out.append(
            "- Relative reconstruction error (0 = exact): keys mean "
            f"{sum(k) / len(k):.3f}, worst {max(k):.3f}; values mean {sum(v) / len(v):.3f}, "
            f"worst {max(v):.3f}."
        )
    return out


def serving(target: dict[str, Any]) -> str:
    """The card's sentence on serving engines for a GQA output of this layout."""
    layout = target.get("format", "stock")
    if layout == "kvconvert" and target.get("model_code"):
        layout = "family"
    return SERVING.get(layout, SERVING["kvconvert"])
