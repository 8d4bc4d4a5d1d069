"""Calibration sources: files, folders, pre-tokenized ids, a Hub dataset, self-sampling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import kvconvert
from kvconvert.calibration.data import (
    continue_sequences,
    load_documents,
    sample_from_model,
    sequence_uniforms,
    tokenize_documents,
)
from kvconvert.errors import KVConvertError
from tests.conftest import load


def _with_tokenizer(src, dst):
    """Copy a tiny model and give it a word-level tokenizer built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(dst)
    return dst


def test_jsonl_input_ids_are_used_verbatim(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 10))}) for i in range(4)))
    toks = tokenize_documents(load_documents(str(f)), None, num_samples=3, seq_len=8, seed=0)
    assert toks.shape == (3, 8)
    # whole documents, each kept in order, joined into one stream (document order is shuffled)
    flat = toks.flatten().tolist()
    starts = [flat[k] for k in range(0, 24, 10)]
    for k, s in enumerate(starts):
        assert flat[k * 10 : k * 10 + 10][: 24 - k * 10] == list(range(s, s + 10))[: 24 - k * 10]


def test_text_jsonl_txt_folder_and_field(tiny_models, tmp_path):
    model = _with_tokenizer(tiny_models["llama"], tmp_path / "m")
    text = " ".join(f"w{i % 60}" for i in range(400))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/a.txt").write_text(text)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": text}) + "\n")
    for calib, extra in [(tmp_path / "data", {}), (tmp_path / "c.jsonl", {"text_field": "body"})]:
        out = kvconvert.convert(
            str(model),
            str(tmp_path / f"out-{calib.name}"),
            kv_heads=2,
            calibration=str(calib),
            num_samples=4,
            seq_len=32,
            progress=False,
            **extra,
        )
        rep = json.loads((out / "kvconvert.json").read_text())
        assert rep["calibration"]["sequences"] == 4 and rep["calibration"]["seq_len"] == 32
        assert (out / "tokenizer.json").is_file()


def test_missing_field_is_named(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(KVConvertError, match="row 1 has neither a 'text' string"):
        load_documents(str(f))


def test_too_little_data(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    with pytest.raises(KVConvertError, match="only 3 tokens"):
        tokenize_documents(load_documents(str(f)), None, 4, 8, 0)


def test_hub_dataset_is_fetched_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    repo = tmp_path / "ds"
    (repo / "data").mkdir(parents=True)
    (repo / "data/train.jsonl").write_text(json.dumps({"input_ids": list(range(50))}) + "\n")
    (repo / "data/test.jsonl").write_text(json.dumps({"input_ids": [7] * 50}) + "\n")
    seen = {}

    def fake(repo_id, repo_type=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, repo_type=repo_type)
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    docs = load_documents("someorg/calib-data")
    assert seen == {"repo_id": "someorg/calib-data", "repo_type": "dataset"}
    assert docs == [list(range(50))]  # the train split only


def test_self_sampling_is_seeded_and_full_length(tiny_models):
    m = load(tiny_models["mistral"])
    a = sample_from_model(m, 1, num_samples=3, seq_len=20, batch_size=2, seed=7)
    b = sample_from_model(m, 1, num_samples=3, seq_len=20, batch_size=2, seed=7)
    c = sample_from_model(m, 1, num_samples=3, seq_len=20, batch_size=2, seed=8)
    assert a.shape == (3, 20) and (a[:, 0] == 1).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_self_sampling_does_not_depend_on_the_batch(tiny_models):
    """All sequences may decode together: the text is a function of (seed, sequence index)
    only, so batch size and splitting the work into calls change nothing."""
    m = load(tiny_models["mistral"])
    one_by_one = sample_from_model(m, 1, num_samples=5, seq_len=24, batch_size=1, seed=3)
    together = sample_from_model(m, 1, num_samples=5, seq_len=24, batch_size=5, seed=3)
    split = torch.cat(
        [
            sample_from_model(m, 1, num_samples=2, seq_len=24, batch_size=2, seed=3),
            sample_from_model(m, 1, num_samples=3, seq_len=24, batch_size=3, seed=3, first=2),
        ]
    )
    assert torch.equal(one_by_one, together) and torch.equal(together, split)
    assert len({tuple(r) for r in together.tolist()}) == 5  # five different streams


@torch.inference_mode()
def test_self_sampling_follows_the_model_distribution(tiny_models):
    """The first sampled token's frequencies over 4000 sequences match softmax(logits)."""
    m = load(tiny_models["llama"])
    probs = torch.softmax(m(input_ids=torch.tensor([[1]])).logits[0, -1].double(), -1)
    first = sample_from_model(m, 1, num_samples=4000, seq_len=2, batch_size=4000, seed=0)[:, 1]
    freq = torch.bincount(first, minlength=probs.numel()).double() / first.numel()
    assert (freq - probs).abs().max() < 0.025  # about 4 standard errors at p = 0.1
    assert probs.max() > 0.05  # the check is not vacuous: some token is likely


@torch.inference_mode()
def test_continuing_a_prompt_with_the_cache_equals_sampling_without_it(tiny_models):
    """``continue_sequences`` (heal --on-policy) keeps the prompt, and each token it adds is
    the one a full forward over the text so far gives at the same uniform: the cached
    decoding samples the model's own distribution after that prompt."""
    m = load(tiny_models["llama"])
    prompt = torch.randint(
        3, m.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1)
    )
    draws = sequence_uniforms(5, 0, 3, 16)
    out = continue_sequences(m, prompt, 16, draws)
    assert out.shape == (3, 16) and torch.equal(out[:, :5], prompt)
    for t in range(5, 16):
        cdf = torch.softmax(m(input_ids=out[:, :t]).logits[:, -1].double(), -1).cumsum(-1)
        u = (draws[:, t - 5] * cdf[:, -1]).unsqueeze(-1)
        expected = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        assert torch.equal(out[:, t : t + 1], expected), t
    greedy = continue_sequences(m, prompt, 16, draws, temperature=0)
    for t in range(5, 16):
        expected = m(input_ids=greedy[:, :t]).logits[:, -1].argmax(-1)
        assert torch.equal(greedy[:, t], expected), t


def test_sampling_batch_fits_the_cache_budget(tiny_models, monkeypatch):
    from kvconvert.calibration import data

    m = load(tiny_models["llama"])  # 2 layers x (K + V) x 4 heads x 16 x 4 bytes = 1024 B/token
    assert data.decode_batch(m, 1, n=32, seq_len=64, least=8) == 32
    monkeypatch.setattr(data, "SAMPLING_CACHE_BYTES", 1024 * 64 * 12)  # twelve sequences fit
    assert data.decode_batch(m, 1, n=32, seq_len=64, least=8) == 12
    assert data.decode_batch(m, 1, n=32, seq_len=64, least=16) == 16  # never below --batch-size
    assert data.decode_batch(m, 1, n=5, seq_len=64, least=8) == 5
