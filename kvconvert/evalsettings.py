"""EvalSettings: every option of ``kvconvert eval`` in one validated object.

Kept apart from ``kvconvert.evaluate`` (which imports torch) so that the CLI builds its flags and
checks them without importing torch (``kvconvert eval --help`` answers at once).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KVConvertError
from .options import DEVICES, DTYPES, check_choices_and_threads, option, threads_option


@dataclass
class EvalSettings:
    """Every option of ``kvconvert eval``; each field's metadata is its CLI flag's help."""

    data: str = option(
        "self",
        "Evaluation tokens: 'self' (sampled from the original, seeded, disjoint from the "
        "calibration seed); a file (.txt plain text, .jsonl or .json with text or input_ids, "
        ".parquet) or a folder of them; or a Hub dataset id.",
    )
    num_samples: int = option(16, "Evaluation sequences for KL and perplexity.", type=int)
    seq_len: int = option(128, "Tokens per evaluation sequence.", type=int)
    batch_size: int = option(8, "Sequences per forward pass.", type=int)
    seed: int = option(
        1234,
        "Seed for evaluation data, passkeys and copy spans (keep it apart from --seed "
        "of the conversion).",
        type=int,
    )
    text_field: str = option("text", "Field holding the text in .jsonl evaluation data.")
    context: int = option(
        1024,
        "Prompt length for KV bytes, speed and retrieval (capped at the model's "
        "max_position_embeddings minus --new-tokens).",
        type=int,
    )
    new_tokens: int = option(32, "Tokens decoded after the prompt for decode speed.", type=int)
    repeats: int = option(
        3, "Timed runs per model (interleaved); the median is reported.", type=int
    )
    depths: str = option(
        "0,0.25,0.5,0.75,1", "Retrieval depths: where the passkey or copied span sits (0 = start)."
    )
    trials: int = option(
        2,
        "Retrieval prompts per depth (each is a prefill of --context tokens: the slowest part "
        "of an eval on a CPU; 0 turns retrieval off).",
        type=int,
    )
    repetition_tokens: int = option(
        128,
        "Tokens each model continues 8 fixed prompts with (story openings, instructions, chat; "
        "greedy, to eos): the repeated-4-gram share and distinct-2 of those continuations show "
        "greedy loops that KL and perplexity average away. 0 turns it off.",
        type=int,
    )
    device: str = option("auto", "Where models run (auto: CUDA if available).", DEVICES)
    dtype: str = option("auto", "Dtype models are loaded in (auto: the checkpoint's).", DTYPES)
    threads: int | None = threads_option()
    trust_remote_code: bool = option(
        False,
        "Allow models' own code to run. kvconvert outputs (kvconvert.json + auto_map) are "
        "trusted without it; anything else is not.",
    )
    record: bool = option(
        False,
        "Write what was measured (KL, perplexity, KV ratio, the data) into each converted "
        "kvconvert output: its kvconvert.json 'evaluation' and its model card's Fidelity "
        "section.",
    )
    no_cache: bool = option(
        False,
        "Measure the original afresh: neither read nor write the cache of its sampled "
        "evaluation tokens and retrieval scores (kept under $KVCONVERT_CACHE/eval, else "
        "~/.cache/kvconvert/eval).",
        in_recipe=False,
    )

    def validate(self) -> EvalSettings:
        check_choices_and_threads(self)
        for key in ("num_samples", "seq_len", "batch_size", "context", "new_tokens", "repeats"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise KVConvertError(f"{key}: must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise KVConvertError("seq_len: must be at least 2")
        for key in ("trials", "repetition_tokens"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise KVConvertError(f"{key}: must be 0 or more, got {v!r}")
        self.depth_list()
        return self

    def depth_list(self) -> list[float]:
        try:
            out = [float(x) for x in str(self.depths).split(",") if x.strip()]
        except ValueError:
            raise KVConvertError(f"depths: cannot read {self.depths!r} (e.g. 0,0.5,1)") from None
        if not out or any(not 0 <= d <= 1 for d in out):
            raise KVConvertError(f"depths: give fractions between 0 and 1, got {self.depths!r}")
        return out
