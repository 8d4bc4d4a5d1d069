"""The setup every stories/real-model benchmark shares: the original model, held-out
evaluation tokens sampled from it, and KL of a converted output against it.

    from yardstick import Yardstick        # benchmarks/ is on sys.path when run as a script
    ys = Yardstick("../shared/models/stories260K", num_samples=16, seq_len=256)
    ys.kl("out/kv1")                        # mean KL(original || converted), nats/token

Evaluation tokens are sampled at temperature 1 from BOS with seed 1234, apart from the
conversions' default calibration seed 0, so a conversion is never judged on its own
calibration text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kvconvert.calibration.data import sample_from_model
from kvconvert.evaluate import kl_per_token

EVAL_SEED = 1234


def load(folder: str | Path) -> torch.nn.Module:
    """A model or converted output, in eval mode; kvconvert's own model code where the output
    carries it (``auto_map`` in its config)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    remote = "auto_map" in config
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()


class Yardstick:
    def __init__(
        self,
        model: str | Path,
        num_samples: int = 16,
        seq_len: int = 256,
        batch_size: int = 16,
        bos_token_id: int = 1,
    ):
        self.model = str(model)
        self.original = load(model)
        self.tokens = sample_from_model(
            self.original, bos_token_id, num_samples, seq_len, batch_size, seed=EVAL_SEED
        )

    def kl(self, converted: str | Path | torch.nn.Module) -> float:
        """Mean KL(original || converted) per token on the evaluation tokens."""
        model = converted if isinstance(converted, torch.nn.Module) else load(converted)
        return kl_per_token(self.original, model, self.tokens)
