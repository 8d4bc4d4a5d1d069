"""README.md model card of a PoD output."""

from __future__ import annotations

from typing import Any

from .. import card as card_mod


def pod_model_card(
    report: dict[str, Any],
    base_model: str | None,
    source_card: dict[str, Any] | None = None,
    recipe_yaml: str | None = None,
) -> str:
    """The card of a PoD output: what was shared, fidelity, how to load, how to redo (the
    same sections as a GQA card; ``source_card``'s licence is carried over)."""
    src, tgt = report["source"], report["target"]
    merged = report.get("gqa")
    parts = card_mod.CardParts(
        title=" with PoD layer key sharing",
        body=[
            f"Converted from `{src['model']}` by kvconvert "
            f"{report['versions'].get('kvconvert', '')}: upper layers of each block attend to "
            "distant tokens with the block bottom's keys (proximal tokens: the first "
            f"{tgt['sink']} and the last {tgt['recent']} before each query keep their own "
            "keys). The conversion itself changes no weight.",
            "",
            *(
                [
                    f"- KV heads merged first: {src['num_key_value_heads']} -> "
                    f"{merged['target']['num_key_value_heads']} per layer "
                    f"(method `{report['recipe']['method']}`)"
                ]
                if merged
                else []
            ),
            f"- Layer map ({tgt['map_from']}), blocks per KV head: {tgt['blocks']}",
            f"- Predicted KV cache saving at {tgt['context']} tokens: "
            f"{tgt['predicted_kv_saving']:.1%}" + saving_at_line(tgt),
            *bias_lines(tgt),
        ],
        how_to_load=card_mod.load_lines(
            "It needs the PoD modeling code shipped in this folder:",
            remote_code=True,
            maybe_tokenizer=False,
        ),
        serving=SERVING,
    )
    return card_mod.model_card(report, base_model, parts, source_card, recipe_yaml)


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
