"""The repetition measure of ``kvconvert eval``: its arithmetic and its greedy continuations."""

from __future__ import annotations

import pytest
import torch

from kvconvert.repetition import (
    continuations,
    distinct_ngrams,
    prompt_ids,
    repeated_ngrams,
    repetition,
)
from tests.conftest import load


def test_a_loop_is_counted_and_fresh_text_is_not():
    fresh = list(range(40))
    loop = [1, 2, 3, 4, 5] * 8  # "the island of the sea, the island of the sea, ..."
    assert repeated_ngrams(fresh) == (0, 37)
    assert repeated_ngrams(loop) == (32, 37)  # every 4-gram after the first cycle
    assert distinct_ngrams(fresh) == (39, 39)
    assert distinct_ngrams(loop) == (5, 39)
    pooled = repetition([fresh, loop, [7]])  # a one-token answer adds no n-gram
    assert pooled["repeated_4grams"] == pytest.approx(32 / 74)
    assert pooled["distinct_2"] == pytest.approx(44 / 78)
    assert pooled["tokens"] == 81
    assert repetition([[7]]) == {"repeated_4grams": None, "distinct_2": None, "tokens": 1}


def test_continuations_are_the_greedy_ones_and_stop_at_eos(tiny_models):
    model = load(tiny_models["llama"]).eval()
    what, prompts = prompt_ids(None, torch.arange(8 * 40).reshape(8, 40) % 90 + 3)
    assert what == "the first 32 tokens of 8 evaluation sequences" and len(prompts) == 8
    texts = continuations(model, prompts[:2], 12)
    with torch.no_grad():
        for prompt, new in zip(prompts[:2], texts, strict=True):
            ids = torch.tensor([prompt])
            ref = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=0)
            assert new == ref[0, len(prompt) :].tolist()[: len(new)]
    eos = texts[0][-1]  # make the last token an eos: it ends where it first appears
    model.generation_config.eos_token_id = eos
    assert continuations(model, prompts[:1], 12)[0] == texts[0][: texts[0].index(eos) + 1]
