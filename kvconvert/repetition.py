"""How repetitive a model's greedy continuations are: ``kvconvert eval``'s loop detector.

A converted model can keep its perplexity close to the original's and still fall into greedy
loops ("the island of the sea, the island of the sea, ..."): a metric that averages over
positions does not see them. So ``kvconvert eval`` continues a fixed set of prompts greedily
with every model and reports, next to the original's:

- **repeated 4-grams**: the share of the continuations' token 4-grams that already occurred
  earlier in the same continuation (0 for text that never repeats itself, near 1 for a loop);
- **distinct-2**: distinct token bigrams over all bigrams, per continuation, pooled.

The prompts are three story openings, two instructions and three chat questions (the last five
through the tokenizer's chat template when it has one). A model without a tokenizer gets the
first tokens of eight evaluation sequences instead. See docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

STORIES = (
    "Once upon a time, in a small village by the sea,",
    "The old lighthouse keeper had not spoken to anyone in years, until",
    "It was the last day of summer when the letter finally arrived.",
)
INSTRUCTIONS = (
    "Write a short story about a robot who learns to paint.",
    "Describe, step by step, how to make a cup of tea.",
)
CHAT = (
    "Tell me about the history of the bicycle.",
    "What should I pack for a week-long hiking trip?",
    "Why is the sky blue?",
)
#: prompt length, in tokens, when the prompts come from evaluation data (no tokenizer)
DATA_PROMPT_TOKENS = 32


def prompt_ids(tokenizer: Any | None, data: torch.Tensor) -> tuple[str, list[list[int]]]:
    """The prompts as token ids, and what they are (for the report)."""
    if tokenizer is None:
        rows = data[:8, :DATA_PROMPT_TOKENS].tolist()
        return f"the first {DATA_PROMPT_TOKENS} tokens of {len(rows)} evaluation sequences", rows
    out = [list(tokenizer(text)["input_ids"]) for text in STORIES]
    out += [chat_ids(tokenizer, text) for text in (*INSTRUCTIONS, *CHAT)]
    return "3 story openings, 2 instructions, 3 chat questions", out


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` as one user turn of the tokenizer's chat template, ready for the assistant's
    answer (a plain "Question: ... Answer:" where the tokenizer has no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(f"Question: {text}\nAnswer:")["input_ids"])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(chat, add_special_tokens=False)["input_ids"])


def eos_ids(model: torch.nn.Module) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


@torch.inference_mode()
def continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    step: Callable[[], None] = lambda: None,
) -> list[list[int]]:
    """Greedy continuations, each up to ``new_tokens`` or its first eos (kept). One left-padded
    batch through ``generate`` with a plain greedy configuration: the folder's own sampling
    settings and penalties are not applied (they would hide loops)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stop = sorted(eos_ids(model))
    pad = model.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) else (stop[0] if stop else 0)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p))
        mask[i, width - len(p) :] = 1
    plain = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=stop or None, pad_token_id=pad
    )
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=plain
    )
    texts = []
    for row in out[:, width:].tolist():
        ends = [i for i, t in enumerate(row) if t in stop]
        texts.append(row[: ends[0] + 1] if ends else row)
        step()
    return texts


def repeated_ngrams(tokens: Sequence[int], n: int = 4) -> tuple[int, int]:
    """(n-grams seen before in ``tokens``, all n-grams)."""
    seen: set[tuple[int, ...]] = set()
    repeated = total = 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        repeated += gram in seen
        seen.add(gram)
        total += 1
    return repeated, total


def distinct_ngrams(tokens: Sequence[int], n: int = 2) -> tuple[int, int]:
    """(distinct n-grams in ``tokens``, all n-grams)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)), len(grams)


def repetition(texts: Sequence[Sequence[int]]) -> dict[str, float | int | None]:
    """Repeated 4-grams and distinct-2, pooled over continuations (None where too short)."""
    rep = [repeated_ngrams(t) for t in texts]
    dis = [distinct_ngrams(t) for t in texts]
    rep_total, dis_total = sum(t for _, t in rep), sum(t for _, t in dis)
    return {
        "repeated_4grams": sum(r for r, _ in rep) / rep_total if rep_total else None,
        "distinct_2": sum(d for d, _ in dis) / dis_total if dis_total else None,
        "tokens": sum(len(t) for t in texts),
    }
