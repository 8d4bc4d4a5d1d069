"""Measurements usable on their own (tests, demo, benchmarks): KL, perplexity, top-1
agreement, KV cache bytes measured from the real cache object, prefill/decode timing.

Nothing here reads the config to predict the cache: bytes are summed over every tensor the
cache's layers hold, so custom caches of remote-code outputs (per-layer KV heads, PoD layers
whose keys and values differ in length) are measured the same way as ``DynamicCache``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..compat import cache_bytes, cache_kwargs, output_cache
from ..errors import KVConvertError


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: its inputs are moved there."""
    return next(model.parameters()).device


@torch.inference_mode()
def kl_per_token(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 8,
) -> float:
    """Mean KL(reference || candidate) of next-token distributions, nats per token."""
    return fidelity(reference, candidate, tokens, batch_size)["kl"]


@torch.inference_mode()
def nll_per_token(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood, nats per token (exp() is perplexity)."""
    total, count = 0.0, 0
    dev = model_device(model)
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size].to(dev)
        total += float(_nll_sum(model(input_ids=b).logits, b))
        count += b[:, 1:].numel()
    return total / max(count, 1)


#: Rows of logits turned into float64 at once: bounds the measurement's memory to a few
#: hundred MB whatever the batch, sequence length and vocabulary (a 49K vocabulary at 8 x 512
#: tokens would otherwise need about 10 GB for the KL's float64 temporaries).
CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, i + step) for i in range(0, n, step)]


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    lg, tgt = logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for rows in _row_chunks(lg.shape[0], lg.shape[-1]):
        total += F.cross_entropy(lg[rows].double(), tgt[rows], reduction="sum")
    return total


def _kl_sum(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> float:
    """Sum over positions of KL(softmax(ref) || softmax(cand)), in float64, chunk by chunk."""
    r, c = ref_logits.flatten(0, -2), cand_logits.flatten(0, -2)
    total = 0.0
    for rows in _row_chunks(r.shape[0], r.shape[-1]):
        lp = F.log_softmax(r[rows].double(), dim=-1)
        lq = F.log_softmax(c[rows].double(), dim=-1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total


def _fidelity_sums(
    ref_logits: torch.Tensor, cand_logits: torch.Tensor, ids: torch.Tensor
) -> tuple[float, float, float]:
    """Sums over one batch of KL(ref || cand) (every position) and of both models' next-token
    NLL (every position but the last), in float64, chunk by chunk. Each row's log-softmax is
    computed once per model and serves the KL and the NLL alike (``_kl_sum`` and two
    ``_nll_sum`` calls would compute the reference's twice and the candidate's twice)."""
    b, t, v = ref_logits.shape
    r, c = ref_logits.flatten(0, 1), cand_logits.flatten(0, 1)
    target = ids.roll(-1, dims=1).flatten().unsqueeze(1)  # the next token at every position
    scored = (torch.arange(t, device=ids.device) < t - 1).repeat(b)  # the last has no next
    kl = nll_r = nll_c = torch.zeros((), dtype=torch.float64, device=r.device)
    for rows in _row_chunks(r.shape[0], v):
        lp = F.log_softmax(r[rows].double(), dim=-1)
        lq = F.log_softmax(c[rows].double(), dim=-1)
        kl = kl + (lp.exp() * (lp - lq)).sum()
        keep, tgt = scored[rows], target[rows]
        nll_r = nll_r - lp.gather(1, tgt).squeeze(1)[keep].sum()
        nll_c = nll_c - lq.gather(1, tgt).squeeze(1)[keep].sum()
    return float(kl), float(nll_r), float(nll_c)


@torch.inference_mode()
def fidelity(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    tokens: torch.Tensor,
    batch_size: int,
    progress: Any = None,
) -> dict[str, float]:
    """KL(reference || candidate) per token, both models' NLL per token, and how often their
    most likely next tokens agree (top-1 agreement), one pass each. ``progress``: anything
    with ``update(n)`` (a bar), told the sequences done after each batch."""
    kl = nll_r = nll_c = 0.0
    n_kl = n_nll = agree = 0
    dev_r, dev_c = model_device(reference), model_device(candidate)
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size]
        lr = reference(input_ids=b.to(dev_r)).logits
        lc = candidate(input_ids=b.to(dev_c)).logits.to(lr.device)
        sums = _fidelity_sums(lr, lc, b.to(lr.device))
        kl, nll_r, nll_c = kl + sums[0], nll_r + sums[1], nll_c + sums[2]
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        n_kl += b.numel()
        n_nll += b[:, 1:].numel()
        if progress is not None:
            progress.update(b.shape[0])
    return {
        "kl": kl / max(n_kl, 1),
        "nll_reference": nll_r / n_nll,
        "nll": nll_c / n_nll,
        "top1_agreement": agree / max(n_kl, 1),
    }


@torch.inference_mode()
def kv_cache_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes held by the real cache object after a prefill of ``input_ids``."""
    out = model(input_ids=input_ids.to(model_device(model)), use_cache=True)
    cache = output_cache(out)
    if cache is None:
        raise KVConvertError("cache: a forward with use_cache=True returned no cache")
    return cache_bytes(cache)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_decode(
    model: torch.nn.Module, ids: torch.Tensor, new_tokens: int
) -> tuple[float, float, int, torch.Tensor]:
    """Greedy: prefill ``ids`` then decode ``new_tokens``.

    Returns (prefill seconds, decode seconds, cache bytes right after the prefill, new ids).
    The decode loop stays on the device (no host sync per token except on CUDA timing).
    """
    dev = model_device(model)
    ids = ids.to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(dev)
    t1 = time.perf_counter()
    nbytes = cache_bytes(output_cache(out))
    gen = decode(model, out, new_tokens)
    _sync(dev)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, nbytes, gen


def decode(model: torch.nn.Module, out: Any, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy ids after a prefill's output ``out`` (its cache, its last logits),
    staying on the device: no host sync per token."""
    cache = output_cache(out)
    nxt = out.logits[:, -1:].argmax(-1)
    gen = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        gen.append(nxt)
    return torch.cat(gen, dim=1)
