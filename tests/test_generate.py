"""``generate()`` is the test: every output kind, as a user loads it, decodes with its cache
exactly as its own full forward does.

For each kind the output is converted from a tiny seeded model, loaded with the stock class or
``trust_remote_code=True``, and transformers' own ``generate()`` runs greedy for 48 new tokens
(far past PoD's recent window) on one prompt and on a left-padded batch of two, under eager
and SDPA attention. Every generated token must be the argmax of the uncached forward over the
generated sequence. This is what broke silently when transformers 5.24 renamed the cache
argument (``generate()`` passed ``cache=``, which the remote code ignored).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kvconvert
from tests.conftest import FAST, load, token_ids
from tests.models import build, gemma2_4layer, llama_deci_width

NEW_TOKENS = 48
EOS = 2  # every tiny source's eos_token_id
SINK, RECENT = 2, 8
POD = {"sink": SINK, "recent": RECENT, "kv_saving": 0.1, **FAST}


def llama(root: Path) -> Path:
    return build("llama", root / "src")


def arch(name: str) -> Callable[[Path], Path]:
    return lambda root: build(name, root / "src")


#: output kind -> (source builder, convert options)
KINDS: dict[str, tuple[Callable[[Path], Path], dict]] = {
    "gqa": (llama, {"kv_heads": 2, **FAST}),
    "budget": (llama, {"kv_heads_per_layer": "2,1", **FAST}),
    "deci": (lambda root: llama_deci_width(root / "src"), {"kv_heads_per_layer": "2,1", **FAST}),
    "project": (llama, {"kv_heads": 2, "rope_keys": "project", **FAST}),
    "pod": (llama, {"target": "pod", **POD}),
    "gqa,pod": (llama, {"target": "gqa,pod", "kv_heads": 2, **POD}),
    "gpt2-gqa": (arch("gpt2"), {"kv_heads": 2, **FAST}),
    "gpt_neox-gqa": (arch("gpt_neox"), {"kv_heads": 2, **FAST}),
    "opt-gqa": (arch("opt"), {"kv_heads": 2, **FAST}),
    "phi3-pod": (arch("phi3"), {"target": "pod", **POD}),
    "qwen3-pod": (arch("qwen3"), {"target": "pod", **POD}),
    "gemma-pod": (arch("gemma"), {"target": "pod", **POD}),
    # four layers: the two-layer gemma2 has one full-attention layer, nothing to share with
    "gemma2-pod": (lambda root: gemma2_4layer(root / "src"), {"target": "pod", **POD}),
}
#: the stock gemma2 refuses SDPA (soft-capping needs eager)
IMPLS = {kind: ["eager"] if kind.startswith("gemma2") else ["eager", "sdpa"] for kind in KINDS}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The output of a kind, converted on first use (a test run converts only what it uses)."""
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            root = tmp_path_factory.mktemp(kind.replace(",", "-"))
            builder, options = KINDS[kind]
            made[kind] = kvconvert.convert(str(builder(root)), str(root / "out"), **options)
        return made[kind]

    return make


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s rule for positions under a padding mask (padding slots get 1)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def disagreements(model, sequences: torch.Tensor, mask: torch.Tensor, prompt: int) -> list[str]:
    """Generated tokens that are not the argmax of the uncached forward over the sequence (a
    tie within 1e-4 of the top logit counts as agreeing; EOS, which ``min_new_tokens``
    suppresses, is left out of the argmax)."""
    with torch.no_grad():
        logits = model(
            input_ids=sequences,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=False,
        ).logits.float()
    logits[..., EOS] = float("-inf")
    bad = []
    for row in range(sequences.shape[0]):
        for t in range(prompt, sequences.shape[1]):
            scores, token = logits[row, t - 1], sequences[row, t]
            if scores.max() - scores[token] > 1e-4:
                bad.append(
                    f"row {row} new token {t - prompt}: {int(token)} vs argmax "
                    f"{int(scores.argmax())}"
                )
    return bad


@pytest.mark.parametrize(
    ("kind", "attn"), [(k, a) for k in KINDS for a in IMPLS[k]], ids=lambda x: str(x)
)
def test_generate_equals_uncached_argmax(outputs, kind, attn):
    out = outputs(kind)
    remote = "auto_map" in json.loads((out / "config.json").read_text())
    model = load(out, trust_remote_code=remote, attn_implementation=attn)
    vocab = model.config.vocab_size
    kw = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=EOS,
    )
    # one prompt longer than sink + recent, then a left-padded batch of two
    a, b = token_ids(1, 20, seed=1, vocab=vocab)[0], token_ids(1, 13, seed=2, vocab=vocab)[0]
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 7:], mask[1, 7:] = b, 1
    for prompt_ids, prompt_mask in ((a[None], torch.ones(1, 20, dtype=torch.long)), (ids, mask)):
        with torch.no_grad():
            seq = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)
        assert seq.shape[1] == 20 + NEW_TOKENS
        full_mask = torch.cat(
            [prompt_mask, torch.ones(seq.shape[0], NEW_TOKENS, dtype=torch.long)], 1
        )
        bad = disagreements(model, seq, full_mask, 20)
        assert not bad, (
            f"{kind} ({attn}, batch {seq.shape[0]}): {len(bad)} of "
            f"{seq.shape[0] * NEW_TOKENS} generated tokens differ: {bad[:3]}"
        )


POD_KINDS = [(k, a) for k in KINDS if k.endswith("pod") for a in IMPLS[k]]


@pytest.mark.parametrize(("kind", "attn"), POD_KINDS, ids=lambda x: str(x))
def test_pod_prefill_in_pieces_equals_one_piece(outputs, kind, attn, monkeypatch):
    """A PoD prompt longer than the model code's ``PREFILL`` runs through the model in pieces
    (its activations are one piece's): on every PoD architecture, for a left-padded batch, its
    logits are the one-piece forward's, and ``generate()`` from it decodes as the uncached
    forward does."""
    out = outputs(kind)
    model = load(out, trust_remote_code=True, attn_implementation=attn)
    module = sys.modules[type(model).forward.__module__]  # the PoD core, with PREFILL
    vocab = model.config.vocab_size
    ids = token_ids(2, 30, seed=3, vocab=vocab)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    args = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    with torch.no_grad():
        whole = model(**args).logits
        monkeypatch.setattr(module, "PREFILL", 7)
        pieces = model(**args).logits
        seq = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=EOS,
        )
    assert (pieces - whole).abs().max() < 1e-5
    monkeypatch.undo()  # the uncached forward in one piece
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], 1)
    bad = disagreements(model, seq, full_mask, 30)
    assert not bad, f"{kind} ({attn}): {bad[:3]}"
