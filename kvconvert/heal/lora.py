"""A minimal LoRA for healing: low-rank updates on chosen ``nn.Linear`` modules, merged back.

Hand-written rather than peft: healing only needs ``W + B @ A`` on a few projections of a
model that may be remote code, a merge that writes the result into the checkpoint's own
tensor names, and no adapter files in the output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + x A^T B^T``: ``A`` (rank x in) random, ``B`` (out x rank) zero at start.

    The adapter is kept in float32 whatever the base dtype; with B = 0 the wrapped module
    computes exactly what ``base`` did.
    """

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        dev = base.weight.device
        a = torch.empty(rank, base.in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(base.in_features)  # kaiming_uniform(a=sqrt(5)), as nn.Linear
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(dev))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A`` in float32: what merging adds to ``base.weight``."""
        return self.lora_b.detach().float() @ self.lora_a.detach().float()


def add_lora(
    model: nn.Module, module_names: list[str], rank: int, seed: int
) -> dict[str, LoRALinear]:
    """Wrap each named ``nn.Linear`` of ``model`` in a LoRALinear (in place); name -> wrapper."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(module_names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not nn.Linear")
        wrapper = LoRALinear(base, rank, gen)
        setattr(parent, child, wrapper)
        out[name] = wrapper
    return out
