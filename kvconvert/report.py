"""What a conversion records about itself: ``kvconvert.json`` and the README model card."""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

import torch

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("kvconvert", "torch", "transformers", "safetensors", "huggingface_hub"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def kv_bytes_per_token(kv_heads_per_layer: list[int], head_dim: int, dtype: torch.dtype) -> int:
    """Keys + values of every layer for one token, as a dense cache stores them."""
    return 2 * sum(kv_heads_per_layer) * head_dim * torch.empty((), dtype=dtype).element_size()


def model_card(report: dict[str, Any], base_model: str | None) -> str:
    """README.md for the output: Hub metadata (base_model, tags) and what was done."""
    from huggingface_hub import ModelCardData

    src, tgt, kvb = report["source"], report["target"], report["kv_bytes_per_token"]
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        library_name="transformers",
        tags=["kvconvert", report["recipe"]["target"]],
    )
    saving = 1 - kvb["after"] / kvb["before"] if kvb["before"] else 0.0
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {src['model'].rstrip('/').split('/')[-1]} with {_heads(tgt)} KV heads",
        "",
        f"Converted from `{src['model']}` by [kvconvert](https://github.com/) "
        f"{report['versions'].get('kvconvert', '')}: KV-head merging from "
        f"{src['num_key_value_heads']} to {_heads(tgt)} KV heads per layer "
        f"(method `{report['recipe']['method']}`, RoPE keys `{report['recipe']['rope_keys']}`, "
        f"objective `{report['recipe']['objective']}`, grouping `{report['recipe']['grouping']}`).",
        "",
        f"- KV cache per token: {kvb['before']} bytes -> {kvb['after']} bytes "
        f"({saving:.0%} smaller)",
        f"- Calibration: {report['calibration']['source']}, "
        f"{report['calibration']['sequences']} x {report['calibration']['seq_len']} tokens",
        "- Per-layer relative reconstruction error (keys / values): "
        + ", ".join(
            f"L{r['layer']} {r['key_error']:.3f}/{r['value_error']:.3f}" for r in report["layers"]
        ),
        "",
        *_loading(tgt),
        "",
        "Reproduce with:",
        "",
        "```",
        report["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _loading(target: dict[str, Any]) -> list[str]:
    """How to load the output: stock classes, or the bundled remote code."""
    if not target.get("remote_code"):
        return [
            "This is an ordinary grouped-query-attention checkpoint of the original "
            "architecture; it loads with the stock classes, no remote code:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("path/or/repo")',
            "```",
        ]
    what = []
    if isinstance(target["num_key_value_heads"], list):
        what.append(f"per-layer KV heads {target['num_key_value_heads']}")
    if target.get("key_projection_heads"):
        what.append("keys projected after RoPE at run time (the GQA paper's method)")
    return [
        f"This checkpoint has {' and '.join(what)}, which no stock transformers class "
        "expresses. Its model code (`configuration_kvconvert.py`, `modeling_kvconvert.py`, "
        "transformers only; kvconvert is not needed) ships in this folder; load it with "
        "`trust_remote_code=True`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("path/or/repo", trust_remote_code=True)',
        "```",
    ]


def _heads(target: dict[str, Any]) -> str:
    g = target["num_key_value_heads"]
    return ",".join(map(str, g)) if isinstance(g, list) else str(g)
