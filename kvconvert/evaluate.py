"""Fidelity and memory measurements shared by the demo, the tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def kl_per_token(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 8,
) -> float:
    """Mean KL(reference || candidate) of next-token distributions, nats per token."""
    total, count = 0.0, 0
    dev_r = next(reference.parameters()).device
    dev_c = next(candidate.parameters()).device
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size]
        lp = F.log_softmax(reference(input_ids=b.to(dev_r)).logits.double(), dim=-1)
        lq = F.log_softmax(candidate(input_ids=b.to(dev_c)).logits.double(), dim=-1).to(lp.device)
        total += float((lp.exp() * (lp - lq)).sum())
        count += b.numel()
    return total / max(count, 1)


@torch.inference_mode()
def nll_per_token(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood, nats per token (exp() is perplexity)."""
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size].to(dev)
        logits = model(input_ids=b).logits[:, :-1].double()
        total += float(F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
        count += b[:, 1:].numel()
    return total / max(count, 1)


@torch.inference_mode()
def kv_cache_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes held by the real cache object after a prefill of ``input_ids`` (keys + values)."""
    dev = next(model.parameters()).device
    out = model(input_ids=input_ids.to(dev), use_cache=True)
    total = 0
    for layer in out.past_key_values.layers:
        # cache layers that hold more than keys/values (PoD's windowed keys) list them all
        tensors = layer.cached_tensors() if hasattr(layer, "cached_tensors") else ()
        for t in tensors or (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total
