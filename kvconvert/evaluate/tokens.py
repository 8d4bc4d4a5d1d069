"""The evaluation tokens every model is measured on: sampled from the original for
``--data self`` (kept in the eval cache, ``kvconvert.evalcache``), else read and tokenized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..evalcache import EvalCache
from ..evalsettings import EvalSettings
from .progress import Phase, say


def _valid_tokens(value: Any, n: int, length: int, vocab: int | None) -> bool:
    if not (isinstance(value, list) and len(value) == n):
        return False
    top = vocab if vocab is not None else 2**63
    return all(
        isinstance(row, list)
        and len(row) == length
        and all(isinstance(t, int) and 0 <= t < top for t in row)
        for row in value
    )


def evaluation_tokens(
    settings: EvalSettings,
    model: torch.nn.Module,
    folder: Path,
    tokenizer: Any | None,
    bos: int,
    cache: EvalCache | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The evaluation tokens: sampled from ``model`` for ``--data self`` (from ``cache`` when
    it holds them: sampling is a decode loop, the slowest part after retrieval), else read and
    tokenized (fast; never cached)."""
    from ..calibration.data import (
        decode_batch,
        load_documents,
        sample_from_model,
        tokenize_documents,
        vocab_size,
    )

    vocab = vocab_size(json.loads((folder / "config.json").read_text()))
    if settings.data == "self":
        n, length = settings.num_samples, settings.seq_len
        key = {
            "seed": settings.seed,
            "num_samples": n,
            "seq_len": length,
            "batch_size": settings.batch_size,
            "bos": bos,
        }
        if cache is not None:
            hit = cache.get("samples", key, lambda v: _valid_tokens(v, n, length, vocab))
            if hit is not None:
                say(progress, f"evaluation tokens: {n} x {length} sampled earlier (eval cache)")
                return torch.tensor(hit, dtype=torch.long)
        batch = decode_batch(model, bos, n, length, settings.batch_size)
        steps = -(-n // batch) * (length - 1)
        with Phase("sampling evaluation tokens", steps, "steps", progress, after=3) as bar:
            tokens = sample_from_model(model, bos, n, length, batch, settings.seed, None, bar)
        tokens = tokens.cpu()
        if cache is not None:
            cache.put("samples", key, tokens.tolist())
        return tokens
    docs = load_documents(settings.data, settings.text_field)
    return tokenize_documents(
        docs, tokenizer, settings.num_samples, settings.seq_len, settings.seed, vocab
    )
