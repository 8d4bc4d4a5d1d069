"""HealOptions: every option of ``kvconvert heal`` in one validated object.

Like the conversion Recipe, each field's metadata is its CLI flag's help, so the ``heal``
command's flags are generated from this class and the effective options are recorded in the
output's ``kvconvert.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

from ..errors import KVConvertError
from ..options import DEVICES, check_choices_and_threads, option, threads_option
from ..pod.options import proximal_window

TRAIN = ("attention", "all")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TEACHER_DEVICES = ("same", "cpu")

#: Default tokens per training sequence, and per micro-batch (batch_size x seq_len).
SEQ_LEN = 128
STEP_TOKENS = 1024

#: Options that do not change what a run computes; a --resume may change them.
RUNTIME_ONLY = ("output", "device", "teacher_device", "save_every", "resume", "overwrite")


@dataclass
class HealOptions:
    """All options of a healing run (distillation from the original into the converted model)."""

    original: str = option(None, "The model before conversion (teacher).", cli="argument")
    converted: str = option(None, "The converted model folder (student).", cli="argument")
    output: str = option(
        None,
        "Output folder for the healed model (refused if it exists).",
        short="-o",
        required=True,
    )
    steps: int = option(
        100,
        "Optimiser steps (100: under 30 min for SmolLM2-135M on 2 CPU cores, sampling "
        "included; docs/heal.md).",
        type=int,
    )
    train: str = option(
        "attention",
        "attention: only the attention blocks the conversion changed (q/k/v/o of merged layers); "
        "all: every parameter.",
        TRAIN,
    )
    lora: int = option(
        0,
        "Train rank-R LoRA adapters on the converted projections instead (0: off); they are "
        "merged into the weights before saving.",
        type=int,
    )
    lr: float | None = option(
        None,
        "Peak learning rate (default: 0.64 / hidden_size: 1e-2 at width 64, 1.6e-4 at 4096).",
        type=float,
    )
    optimizer: str = option("adamw", "Optimiser.", OPTIMIZERS)
    weight_decay: float = option(0.0, "Weight decay (AdamW) / L2 (SGD).", type=float)
    warmup: float = option(0.05, "Linear warm-up, as a fraction of --steps.", type=float)
    schedule: str = option(
        "cosine", "After warm-up: cosine decay to --final-lr x lr, or constant.", SCHEDULES
    )
    final_lr: float = option(
        0.1,
        "Where the cosine decay ends, as a fraction of --lr (lower: less gradient noise at the "
        "end of a run).",
        type=float,
    )
    batch_size: int | None = option(
        None,
        f"Sequences per micro-batch (default: {STEP_TOKENS} tokens' worth, at least 1: 8 at "
        "128 tokens).",
        type=int,
    )
    grad_accum: int = option(1, "Micro-batches per optimiser step.", type=int)
    seq_len: int | None = option(
        None,
        f"Tokens per training sequence (default: {SEQ_LEN}; for a PoD output whose layers "
        "borrow keys, 4 x (sink + recent), so that most tokens have distant tokens to learn "
        "from).",
        type=int,
    )
    num_samples: int = option(
        2048, "Training sequences drawn from --calibration (cycled through).", type=int
    )
    eval_samples: int = option(
        16, "Held-out sequences on which KL is measured before and after (0: skip).", type=int
    )
    hard_label_weight: float = option(
        0.0, "Weight of the next-token cross-entropy added to the KL (0: pure KL).", type=float
    )
    on_policy: float = option(
        0.0,
        "Share of each micro-batch's sequences that the converted model writes itself at "
        "that step: it continues the first quarter of a training sequence (at "
        "--on-policy-temperature) and is trained on the original's distributions over its "
        "own text, the prefixes its greedy loops start from (0: off; docs/heal.md).",
        type=float,
    )
    on_policy_temperature: float = option(
        1.0,
        "Sampling temperature of the --on-policy text (0: greedy, the text a greedy decoder "
        "shows users, loops included).",
        type=float,
    )
    calibration: str = option(
        "self",
        "Training text: 'self' (sampled from the original from BOS), a .txt file or folder, a "
        ".jsonl (text or input_ids), or a Hub dataset id.",
    )
    text_field: str = option("text", "Field holding the text in .jsonl data.")
    seed: int = option(0, "Seed for sampling, data order and LoRA init.", type=int)
    device: str = option("auto", "Where training runs (auto: CUDA if available).", DEVICES)
    threads: int | None = threads_option()
    teacher_device: str = option(
        "same",
        "Where the original model runs: the training device, or cpu to save memory.",
        TEACHER_DEVICES,
    )
    precision: str = option(
        "auto",
        "auto: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere; "
        "bf16/fp16 autocast need CUDA.",
        PRECISIONS,
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass (long sequences, less memory)."
    )
    save_every: int = option(
        100, "Save a resumable state every N steps (and on Ctrl-C); 0: only on Ctrl-C.", type=int
    )
    resume: bool = option(False, "Continue an interrupted run from its saved state.")
    revision: str | None = option(None, "Hub revision of ORIGINAL.")
    trust_remote_code: bool = option(False, "Allow ORIGINAL's own code to run (off by default).")
    overwrite: bool = option(False, "Replace an existing output folder.")

    def validate(self) -> HealOptions:
        """Check every field; raise KVConvertError naming the bad option."""
        if not self.original or not self.converted or not self.output:
            raise KVConvertError("original, converted and output are required")
        check_choices_and_threads(self)
        for key in ("steps", "batch_size", "grad_accum", "num_samples"):
            v = getattr(self, key)
            if v is None and key == "batch_size":
                continue
            if not isinstance(v, int) or v < 1:
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
        for key in ("lora", "eval_samples", "save_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise KVConvertError(f"{key}: must be a non-negative integer, got {v!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise KVConvertError("seq_len: must be at least 2")
        if self.lr is not None and not self.lr > 0:
            raise KVConvertError(f"lr: must be positive, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise KVConvertError(f"warmup: a fraction of --steps in [0, 1), got {self.warmup!r}")
        if not 0 <= self.final_lr <= 1:
            raise KVConvertError(f"final_lr: a fraction of --lr in [0, 1], got {self.final_lr!r}")
        if not 0 <= self.on_policy <= 1:
            raise KVConvertError(
                f"on_policy: a share of each micro-batch in [0, 1], got {self.on_policy!r}"
            )
        if self.on_policy_temperature < 0:
            raise KVConvertError(
                f"on_policy_temperature: must be >= 0, got {self.on_policy_temperature!r}"
            )
        if self.weight_decay < 0 or self.hard_label_weight < 0:
            raise KVConvertError("weight_decay and hard_label_weight must be >= 0")
        if self.lora and self.train == "all":
            raise KVConvertError(
                "lora: --lora trains adapters on the converted projections; it does not combine "
                "with --train all"
            )
        return self

    def resolve_lengths(self, config: Any) -> HealOptions:
        """Fill the automatic ``seq_len`` and ``batch_size`` from the converted model's config.

        A PoD model differs from the original only where a query has distant tokens (beyond
        the first ``pod_sink`` and the last ``pod_recent``), so its sequences are 4 x (sink +
        recent) long; the batch keeps a step at ``STEP_TOKENS`` tokens either way
        (docs/heal.md).
        """
        if self.seq_len is None:
            window = proximal_window(config)
            self.seq_len = SEQ_LEN if window is None else max(SEQ_LEN, 4 * sum(window))
        if self.batch_size is None:
            self.batch_size = max(1, STEP_TOKENS // self.seq_len)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide what a run computes (a --resume must match them)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


#: The healing options ``kvconvert convert`` takes too, as ``--heal-<name>``.
IN_CONVERT = ("steps", "train", "lora", "lr", "final_lr", "batch_size", "seq_len", "num_samples")
#: What a convert-then-heal run's healing shares with its conversion, by the same name.
SHARED = (
    "calibration",
    "text_field",
    "seed",
    "device",
    "threads",
    "revision",
    "trust_remote_code",
    "overwrite",
)


def _heal_group() -> type:
    """The ``heal_*`` fields of ``Recipe``: HealOptions' own declarations under a prefix
    (declared once, in HealOptions), healing off unless ``--heal-steps`` is given."""
    hints = get_type_hints(HealOptions)
    specs = []
    for f in fields(HealOptions):
        if f.name not in IN_CONVERT:
            continue
        meta, default = dict(f.metadata), f.default
        if f.name == "steps":
            default, meta["help"] = (
                0,
                (
                    "After converting, heal by distillation from the original for N steps (0: "
                    "off); see kvconvert heal for every healing option."
                ),
            )
        else:
            meta["help"] = f"With --heal-steps: kvconvert heal's --{f.name.replace('_', '-')}. "
            meta["help"] += f.metadata["help"]
        specs.append((f"heal_{f.name}", hints[f.name], field(default=default, metadata=meta)))
    group = make_dataclass("HealGroup", specs)
    group.__module__ = __name__
    group.__doc__ = "The healing options of a convert-then-heal run (``--heal-steps``)."
    return group


HealGroup = _heal_group()
