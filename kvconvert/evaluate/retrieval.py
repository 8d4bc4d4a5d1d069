"""The retrieval probe: a passkey for models with a tokenizer, a copy task on token ids
otherwise, at several depths of a ``--context``-long prompt (docs/evaluation.md)."""

from __future__ import annotations

import inspect
import math
import random
import re
from typing import Any

import torch

from ..evalsettings import EvalSettings
from .metrics import decode, model_device

PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def passkey_prompt(tokenizer: Any, context: int, depth: float, key: int) -> list[int]:
    """Filler text of about ``context`` tokens with the passkey sentence at ``depth``.

    The key goes after ``depth`` of the filler passages but the last, so that even at depth 1
    one passage stands between it and the question. Right before the question, the key
    sentence's own ending ("N is the pass key.") is what the question ends on, and a small
    model continues the pattern instead of answering: SmolLM2-135M said " the pass key." and
    found 0/4 keys there, 4/4 at every other depth; a probe the original fails measures
    nothing."""
    intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"

    def n(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    room = context - n(intro) - n(needle) - n(question) - 4
    reps = max(room // max(n(PASSKEY_FILLER), 1), 1)
    k = round(depth * (reps - 1))
    text = intro + PASSKEY_FILLER * k + needle + PASSKEY_FILLER * (reps - k) + question
    return tokenizer(text)["input_ids"][-context:]


def copy_prompt(
    filler: torch.Tensor, context: int, depth: float, span: list[int], prefix: int, bos: int
) -> list[int]:
    """Token-id retrieval: ``span`` hidden at ``depth`` in filler, its first ``prefix`` ids
    repeated at the end; the model should continue with the rest of the span."""
    n_fill = max(context - 1 - len(span) - prefix, 1)
    reps = math.ceil(n_fill / filler.numel())
    fill = filler.repeat(reps)[:n_fill].tolist()
    k = round(depth * n_fill)
    return [bos, *fill[:k], *span, *fill[k:], *span[:prefix]]


COPY_SPAN, COPY_PREFIX = 16, 4


def retrieval_tasks(
    settings: EvalSettings,
    context: int,
    tokenizer: Any | None,
    filler: torch.Tensor,
    vocab_size: int,
    bos: int,
) -> dict[str, Any]:
    """The prompts and expected answers for every depth (the same for every model)."""
    rng = random.Random(settings.seed)
    depths = settings.depth_list()
    prompts: list[list[tuple[list[int], Any]]] = []
    for d in depths:
        row = []
        for _ in range(settings.trials):
            if tokenizer is not None:
                key = rng.randint(10000, 99999)
                row.append((passkey_prompt(tokenizer, context, d, key), key))
            else:
                span = [rng.randrange(3, vocab_size) for _ in range(COPY_SPAN)]
                row.append(
                    (copy_prompt(filler, context, d, span, COPY_PREFIX, bos), span[COPY_PREFIX:])
                )
        prompts.append(row)
    if tokenizer is not None:
        kind, metric = "passkey", "exact match of the 5-digit key"
    else:
        kind = "copy"
        metric = f"token accuracy continuing a {COPY_SPAN}-id span from its first {COPY_PREFIX}"
    return {"task": kind, "metric": metric, "depths": depths, "prompts": prompts}


def keeps_last_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` by name (transformers' own rule
    for using it in ``generate``): a retrieval prompt then needs the output head for its last
    position only, not for all ``--context`` of them (a fifth of SmolLM2's prefill)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt: ``new_tokens`` ids (the retrieval probes' decoder;
    untimed, so the prefill computes the last position's logits only where it can)."""
    last = {"logits_to_keep": 1} if keeps_last_logits(model) else {}
    out = model(input_ids=ids.to(model_device(model)), use_cache=True, **last)
    return decode(model, out, new_tokens)[0].tolist()


#: Tokens generated after a passkey prompt; the first number in them is the answer.
PASSKEY_NEW_TOKENS = 8


@torch.inference_mode()
def run_retrieval(
    model: torch.nn.Module, tasks: dict[str, Any], tokenizer: Any | None, progress: Any = None
) -> dict:
    """Score ``model`` on every prompt of ``tasks``; ``progress`` (a bar) is told each one."""
    acc = []
    for row in tasks["prompts"]:
        scores = []
        for prompt, answer in row:
            ids = torch.tensor([prompt])
            if tasks["task"] == "passkey":
                gen = greedy(model, ids, PASSKEY_NEW_TOKENS)
                m = re.search(r"\d+", tokenizer.decode(gen))
                scores.append(float(m is not None and m.group() == str(answer)))
            else:
                got = greedy(model, ids, len(answer))
                scores.append(sum(a == b for a, b in zip(got, answer, strict=True)) / len(answer))
            if progress is not None:
                progress.update(1)
        acc.append(sum(scores) / len(scores) if scores else None)
    return {
        "task": tasks["task"],
        "metric": tasks["metric"],
        "depths": tasks["depths"],
        "trials": len(tasks["prompts"][0]) if tasks["prompts"] else 0,
        "accuracy": acc,
    }
