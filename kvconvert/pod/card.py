"""README.md model card of a PoD output."""

from __future__ import annotations

from typing import Any

from .. import report as report_mod


def pod_model_card(
    report: dict[str, Any],
    base_model: str | None,
    source_card: dict[str, Any] | None = None,
    recipe_yaml: str | None = None,
) -> str:
    """The card of a PoD output: what was shared, fidelity, how to load, how to redo (the
    same sections as a GQA card; ``source_card``'s licence is carried over)."""
    from huggingface_hub import ModelCardData

    src, tgt = report["source"], report["target"]
    carried = {k: v for k, v in (source_card or {}).items() if k in report_mod.CARRIED_KEYS and v}
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["kvconvert", "pod"],
        **carried,
    )
    name = report_mod.title_name(src, base_model)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name} with PoD layer key sharing",
        "",
        f"Converted from `{src['model']}` by kvconvert {report['versions'].get('kvconvert', '')}"
        ": upper layers of each block attend to distant tokens with the block bottom's keys "
        f"(proximal tokens: the first {tgt['sink']} and the last {tgt['recent']} before each "
        "query keep their own keys). The conversion itself changes no weight.",
        "",
        *(
            [
                f"- KV heads merged first: {src['num_key_value_heads']} -> "
                f"{report['gqa']['target']['num_key_value_heads']} per layer "
                f"(method `{report['recipe']['method']}`)"
            ]
            if "gqa" in report
            else []
        ),
        f"- Layer map ({tgt['map_from']}), blocks per KV head: {tgt['blocks']}",
        f"- Predicted KV cache saving at {tgt['context']} tokens: {tgt['predicted_kv_saving']:.1%}"
        + saving_at_line(tgt),
        *bias_lines(tgt),
        "",
        "## Fidelity",
        "",
        *report_mod.fidelity_lines(report),
        "",
        "## How to load",
        "",
        "It needs the PoD modeling code shipped in this folder:",
        "",
        report_mod.tested_versions(),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'repo = "this-repo-id-or-folder"',
        "model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)",
        "```",
        *report_mod.TOKENIZER_NOTE,
        "",
        f"**Serving.** {SERVING} {report_mod.ENGINE_CHECK}",
        "",
        *report_mod.reproduce_lines(report, recipe_yaml),
        "",
    ]
    return "\n".join(lines)


#: why only transformers serves PoD (docs/serving.md)
SERVING = (
    "Only transformers runs PoD: for distant tokens its upper layers attend with their block "
    "bottom's keys, which the attention kernels of serving engines do not do. vLLM stops at "
    "start-up with that reason rather than serve the dense model; llama.cpp's converter does "
    "not know the architecture."
)


def bias_lines(target: dict[str, Any]) -> list[str]:
    """One line saying how many borrowing heads took each distant bias (none without one)."""
    grid, bias = target.get("distant_bias_grid"), target.get("distant_bias")
    if not grid or bias is None:
        return []
    borrowed = [
        b
        for layer, row in enumerate(target["pod_map"])
        for h, b in zip(row, bias[layer], strict=True)
        if h != layer
    ]
    counts = ", ".join(f"{g:g}: {borrowed.count(g)}" for g in grid)
    return [
        f"- Bias on borrowed distant logits, chosen per borrowing head from {grid} "
        f"(`config.pod_distant_bias`); heads per bias: {counts}"
    ]


def saving_at_line(tgt: dict[str, Any]) -> str:
    """The saving at other context lengths (none below sink + recent tokens)."""
    others = [
        f"{float(v):.1%} at {k}"
        for k, v in (tgt.get("saving_at") or {}).items()
        if int(k) != tgt["context"]
    ]
    return f" ({', '.join(others)})" if others else ""
