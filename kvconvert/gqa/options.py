"""The options of ``--target gqa``, declared and checked here (docs/cli.md is built from
them); ``Recipe`` holds them with the other groups (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import KVConvertError
from ..options import option
from .names import GROUPINGS, METHODS

ROPE_KEYS = ("complex", "real", "project")
FORMATS = ("auto", "deci", "kvconvert")
SENSITIVITIES = ("measured", "fisher")
OBJECTIVES = ("output", "plain")


@dataclass
class GQAOptions:
    """KV-head merging: how many heads, how they are merged, and the refinement after."""

    kv_heads: int | None = option(
        None, "KV heads per layer after merging; must divide the current count.", type=int
    )
    kv_heads_per_layer: str | None = option(
        None,
        "Comma-separated KV heads for each layer, e.g. 4,2,2,1,1 (each divides the current "
        "count); instead of --kv-heads. Non-uniform counts need trust_remote_code to load.",
    )
    kv_budget: float | None = option(
        None,
        "Fraction of the KV cache to keep, e.g. 0.5; each layer's head count is chosen from "
        "its measured sensitivity (least total KL). Instead of --kv-heads.",
        type=float,
    )
    budget_samples: int = option(
        8, "Calibration sequences used to measure layer sensitivities for --kv-budget.", type=int
    )
    budget_sensitivity: str = option(
        "measured",
        "How --kv-budget finds each layer's sensitivity: measured runs a forward pass per layer "
        "and candidate head count (exact); fisher estimates all of them from one forward and "
        "four backward passes (noisier; worth it when layers x candidates is large).",
        SENSITIVITIES,
    )
    format: str = option(
        "auto",
        "Layout of a per-layer output (KV heads differ between layers): deci is the "
        "DeciLM/Nemotron-NAS layout that vLLM and llama.cpp load; kvconvert is kvconvert's own "
        "model code (also carries --rope-keys project). auto: deci where the model fits it, "
        "else kvconvert, saying why. Uniform outputs are always the stock architecture.",
        FORMATS,
    )
    method: str = option(
        "svd",
        "mean: average the group (baseline); svd-weights: SVD of the weights, no data; "
        "svd: eigendecomposition of calibration activations.",
        METHODS,
    )
    rope_keys: str = option(
        "complex",
        "complex: per-frequency complex merge that commutes with RoPE (exact fold); "
        "real: real PCA that ignores RoPE (baseline, not exact); project: the GQA paper's "
        "PCA of keys after RoPE, applied at run time (remote code, full-width k_proj).",
        ROPE_KEYS,
    )
    objective: str = option(
        "output",
        "output: weigh values by o_proj and keys by the queries that read them; plain: unweighted.",
        OBJECTIVES,
    )
    refine_steps: int | None = option(
        None,
        "Adam steps that fit each merged layer's attention to the original's outputs on the "
        "calibration activations, starting from the merge (0: off). Default: 50 where the run "
        "calibrates (--method svd, --kv-budget) on a llama/mistral/qwen2 model, else 0.",
        type=int,
    )
    refine_lr: float | None = option(
        None,
        "Peak step of --refine-steps relative to each tensor's RMS (default 0.02).",
        type=float,
    )
    refine_rows: int = option(
        64,
        "Query positions per calibration sequence that each refinement step fits, drawn at "
        "random (keys: every position up to them); 0: every position, the fit before 0.2 "
        "(on SmolLM2: 3.4x the conversion time, for KL 0.653 instead of 0.673).",
        type=int,
    )
    grouping: str = option(
        "adjacent", "adjacent heads, or search the grouping that loses least per layer.", GROUPINGS
    )

    def check_gqa(self, target: str) -> None:
        """Refuse bad or conflicting GQA options, naming the option (``target``: the run's
        ``--target``, which decides which head options are required)."""
        given = [
            k
            for k in ("kv_heads", "kv_heads_per_layer", "kv_budget")
            if getattr(self, k) is not None
        ]
        if target == "gqa" and len(given) != 1:
            raise KVConvertError(
                "kv_heads: --target gqa needs --kv-heads N, or instead exactly one of "
                "--kv-heads-per-layer LIST, --kv-budget FRACTION"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if target == "gqa,pod" and (given != ["kv_heads"] or self.rope_keys == "project"):
            raise KVConvertError(
                "kv_heads: --target gqa,pod needs --kv-heads N (uniform heads; per-layer budgets "
                "and --rope-keys project are not combined with PoD)"
            )
        if target == "pod" and self.kv_heads is not None:
            raise KVConvertError(
                "kv_heads: --kv-heads belongs to --target gqa (or gqa,pod), not pod"
            )
        if self.format != "auto" and target != "gqa":
            raise KVConvertError(f"format: --format applies to --target gqa, not {target}")
        if self.format == "deci" and (self.kv_heads is not None or self.rope_keys == "project"):
            raise KVConvertError(
                "format: --format deci is for per-layer KV heads (--kv-budget, "
                "--kv-heads-per-layer) without --rope-keys project; with --kv-heads N every "
                "layer keeps N heads and the output is the stock architecture"
            )
        if self.refine_steps is not None and (
            not isinstance(self.refine_steps, int) or self.refine_steps < 0
        ):
            got = self.refine_steps
            raise KVConvertError(f"refine_steps: must be an integer >= 0, got {got!r}")
        if not isinstance(self.refine_rows, int) or self.refine_rows < 0:
            raise KVConvertError(f"refine_rows: must be an integer >= 0, got {self.refine_rows!r}")
        if self.refine_lr is not None and not self.refine_lr > 0:
            raise KVConvertError(f"refine_lr: must be > 0, got {self.refine_lr!r}")
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise KVConvertError(f"kv_budget: must be in (0, 1], got {self.kv_budget!r}")
        for key in ("kv_heads", "budget_samples"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
