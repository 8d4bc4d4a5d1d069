"""``kvconvert eval``: KL 0 against itself, measured KV bytes, a stable JSON schema."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

import kvconvert
from kvconvert.cli import main
from kvconvert.errors import KVConvertError
from kvconvert.evaluate import (
    PASSKEY_FILLER,
    EvalSettings,
    cache_bytes,
    copy_prompt,
    evaluate,
    format_table,
    is_kvconvert_output,
    kv_cache_bytes,
    passkey_prompt,
    plot_figure,
    write_plot,
)
from kvconvert.promise import expected_bytes
from tests.conftest import FAST, ROOT, load

SMALL = dict(num_samples=2, seq_len=16, context=40, new_tokens=4, repeats=1, trials=1, depths="0,1")
SMALL_FLAGS = [
    "--num-samples", "2", "--seq-len", "16", "--context", "40", "--new-tokens", "4",
    "--repeats", "1", "--trials", "1", "--depths", "0,1", "-q",
]  # fmt: skip

TOP_KEYS = {"kvconvert_eval", "command", "versions", "device", "settings", "models"}
MODEL_KEYS = {
    "top1_agreement",
    "name",
    "role",
    "model_class",
    "parameters",
    "dtype",
    "kv_bytes_per_token",
    "kv_bytes_at_context",
    "kv_bytes_promised",
    "kv_bytes_over_promise",
    "kv_ratio",
    "kl",
    "nll",
    "ppl",
    "prefill_tok_s",
    "decode_tok_s",
    "timed_runs",
    "retrieval",
    "repetition",
    "conversion",
}
RETRIEVAL_KEYS = {"task", "metric", "depths", "trials", "accuracy"}
REPETITION_KEYS = {"prompts", "repeated_4grams", "distinct_2", "tokens", "continuations"}


@pytest.fixture(scope="module", autouse=True)
def eval_cache(tmp_path_factory):
    """Evals here keep their cache in a folder of their own, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVCONVERT_CACHE", str(tmp_path_factory.mktemp("eval-cache")))
        yield


@pytest.fixture(scope="module")
def halved(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "llama-kv2"
    return kvconvert.convert(str(tiny_models["llama"]), str(out), kv_heads=2, **FAST)


@pytest.fixture(scope="module")
def halved_doc(tiny_models, halved):
    return evaluate(str(tiny_models["llama"]), [str(halved)], EvalSettings(**SMALL), progress=False)


def test_model_against_itself_is_kl_zero_and_equal_bytes(tiny_models):
    src = str(tiny_models["llama"])
    doc = evaluate(src, [src], EvalSettings(**SMALL), progress=False)
    orig, same = doc["models"]
    assert same["kl"] == 0.0
    assert same["top1_agreement"] == orig["top1_agreement"] == 1.0
    assert same["nll"] == orig["nll"] > 0
    assert same["kv_bytes_per_token"] == orig["kv_bytes_per_token"] > 0
    assert same["kv_bytes_at_context"] == orig["kv_bytes_at_context"]
    assert same["kv_ratio"] == 1.0
    assert same["retrieval"]["accuracy"] == orig["retrieval"]["accuracy"]


def test_gqa_halved_has_exactly_half_the_measured_kv_bytes(halved_doc):
    orig, conv = halved_doc["models"]
    # 2 layers x (keys + values) x 4 KV heads x head_dim 16 x 4 bytes, per token
    assert orig["kv_bytes_per_token"] == 2 * 2 * 4 * 16 * 4
    assert conv["kv_bytes_per_token"] * 2 == orig["kv_bytes_per_token"]
    assert conv["kv_bytes_at_context"] * 2 == orig["kv_bytes_at_context"]
    assert orig["kv_bytes_at_context"] == 40 * orig["kv_bytes_per_token"]
    assert conv["kv_ratio"] == 0.5
    assert conv["kl"] > 0
    assert 0 < conv["top1_agreement"] < 1  # halving the heads changes some greedy choices
    target = conv["conversion"]["target"]
    assert target == {
        "kind": "gqa",
        "num_key_value_heads": 2,
        "remote_code": False,
        "format": "stock",
    }


def test_cli_json_schema_is_stable_and_documented(tiny_models, halved, tmp_path):
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(
        main, ["eval", str(tiny_models["llama"]), str(halved), "--json", str(out), *SMALL_FLAGS]
    )
    assert r.exit_code == 0, r.output
    assert re.search(r"llama-kv2\s+512\s+", r.output)  # the terminal table row, bytes/token
    doc = json.loads(out.read_text())
    assert set(doc) == TOP_KEYS and doc["kvconvert_eval"] == 1
    assert set(doc["settings"]) == {f for f in EvalSettings.__dataclass_fields__} | {"eval_tokens"}
    for m in doc["models"]:
        assert set(m) == MODEL_KEYS
        assert set(m["retrieval"]) == RETRIEVAL_KEYS
        assert set(m["repetition"]) == REPETITION_KEYS
        assert m["retrieval"]["task"] == "copy"  # the tiny models have no tokenizer
    assert [m["role"] for m in doc["models"]] == ["original", "converted"]
    documented = (ROOT / "docs/evaluation.md").read_text()
    for key in TOP_KEYS | MODEL_KEYS | RETRIEVAL_KEYS | REPETITION_KEYS:
        assert f"`{key}`" in documented, f"docs/evaluation.md does not document {key!r}"


def test_outputs_keep_what_they_promise_and_a_broken_promise_is_flagged(
    tiny_models, halved, halved_doc, tmp_path
):
    """The promise is the report's bytes at the evaluated context; a cache that holds more
    than its kvconvert.json says (here: a report that claims 1 KV head) is flagged."""
    conv = halved_doc["models"][1]
    assert conv["kv_bytes_promised"] == conv["kv_bytes_at_context"]
    assert not conv["kv_bytes_over_promise"] and "FLAG" not in format_table(halved_doc)
    liar = tmp_path / "liar"
    shutil.copytree(halved, liar)
    report = json.loads((liar / "kvconvert.json").read_text())
    report["kv_bytes_per_token"]["after"] //= 2
    (liar / "kvconvert.json").write_text(json.dumps(report))
    doc = evaluate(str(tiny_models["llama"]), [str(liar)], EvalSettings(**SMALL), progress=False)
    flagged = doc["models"][1]
    assert flagged["kv_bytes_over_promise"]
    assert flagged["kv_bytes_at_context"] == 2 * flagged["kv_bytes_promised"]
    assert "FLAG: liar: its cache holds" in format_table(doc)
    assert "100.0% more than" in format_table(doc)


def test_plot_is_written(halved_doc, tmp_path):
    pytest.importorskip("matplotlib")
    write_plot(halved_doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reads_with_several_models(halved_doc):
    """Names in a legend (never overlapping labels), bytes at the stated context (PoD's saving
    shows there, not per token), one colour scale for every heatmap."""
    pytest.importorskip("matplotlib")
    import copy

    doc = copy.deepcopy(halved_doc)
    twin = copy.deepcopy(doc["models"][1])
    twin["name"] += "-twin"
    for layer in twin["conversion"]["layers"]:
        layer["key_error"] = 3 * layer["key_error"] + 1.0
    doc["models"].append(twin)
    fig = plot_figure(doc)
    top, *maps = fig.axes[: 1 + 2]
    assert not top.texts  # no annotations next to the points
    names = [t.get_text() for t in top.get_legend().get_texts()]
    assert len(names) == 3 and names[0].endswith("(original)")
    assert f"at {doc['settings']['context']} tokens" in top.get_xlabel()
    clims = {tuple(a.images[0].get_clim()) for a in maps}
    assert len(clims) == 1  # one scale
    assert sum(1 for a in fig.axes if a.get_label() == "<colorbar>") == 1


def test_table_leaves_out_retrieval_the_original_cannot_do(halved_doc):
    doc = {**halved_doc, "models": [dict(m) for m in halved_doc["models"]]}
    for m in doc["models"]:
        m["retrieval"] = {**m["retrieval"], "accuracy": [0.0 for _ in m["retrieval"]["accuracy"]]}
    table = format_table(doc)
    assert "retrieval" not in table.splitlines()[0]
    assert "retrieval left out: the original scores 0" in table
    doc["models"][0]["retrieval"]["accuracy"][0] = 1.0  # the original can: the column shows
    assert "retrieval" in format_table(doc).splitlines()[0]


class _OddLayer:
    """A custom cache layer: keys for 6 tokens, values for 3, plus a shared tensor."""

    def __init__(self, shared: torch.Tensor):
        self.keys = torch.zeros(1, 2, 6, 8)
        self.values = torch.zeros(1, 2, 3, 8, dtype=torch.float16)
        self.shared = shared
        self._window = torch.tensor(4096)  # a 0-dim counter, not cache storage
        self.is_initialized = True


def test_cache_bytes_counts_every_tensor_of_custom_layers_once():
    shared = torch.zeros(1, 1, 6, 8)
    cache = type("Cache", (), {})()
    cache.layers = [_OddLayer(shared), _OddLayer(shared)]
    per_layer = 2 * 6 * 8 * 4 + 2 * 3 * 8 * 2
    assert cache_bytes(cache) == 2 * per_layer + 6 * 8 * 4


def test_copy_prompt_places_span_at_depth():
    filler = torch.arange(100, 110)
    span = list(range(3, 19))
    start = copy_prompt(filler, 64, 0.0, span, 4, bos=1)
    end = copy_prompt(filler, 64, 1.0, span, 4, bos=1)
    assert len(start) == len(end) == 64
    assert start[1:17] == span and end[-20:-4] == span
    assert start[-4:] == end[-4:] == span[:4]


class WordTokenizer:
    """A stand-in tokenizer: one id per space-separated word, so a decoded prompt shows
    exactly which words the prompt holds."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        for w in text.split():
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
        return {"input_ids": [self.ids[w] for w in text.split()]}

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_passkey_sentence_is_whole_and_never_right_before_the_question():
    """At every depth, 1 included, the key sentence is whole and a full filler passage stands
    between it and the question: right before the question, "N is the pass key." is what a
    small model continues (SmolLM2-135M answered " the pass key." and found 0/4 keys at depth
    1, 4/4 elsewhere), so the probe measured nothing there."""
    tok = WordTokenizer()
    needle = "The pass key is 12345. Remember it. 12345 is the pass key."
    question = "What is the pass key? The pass key is"
    starts = []
    for depth in (0, 0.25, 0.5, 0.75, 1):
        ids = passkey_prompt(tok, 400, depth, 12345)
        assert len(ids) <= 400
        text = tok.decode(ids)
        assert text.startswith("There is a pass key hidden") and text.endswith(question)
        assert text.count(needle) == 1, (depth, text)
        after = text[text.index(needle) + len(needle) : -len(question)]
        assert PASSKEY_FILLER.strip() in after, (depth, after)
        starts.append(text.index(needle))
    assert starts == sorted(starts) and starts[0] < starts[-1]  # deeper is later


def test_remote_code_is_trusted_only_for_kvconvert_outputs(tiny_models, halved, tmp_path):
    assert not is_kvconvert_output(halved)  # stock GQA output: no auto_map, nothing to trust
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (foreign / "config.json").write_text(json.dumps(cfg))
    assert not is_kvconvert_output(foreign)
    (foreign / "kvconvert.json").write_text("{}")
    assert is_kvconvert_output(foreign)


def test_bad_settings_are_one_line_errors(tiny_models):
    with pytest.raises(KVConvertError, match="depths"):
        EvalSettings(depths="0,2").validate()
    with pytest.raises(KVConvertError, match="at least one converted"):
        evaluate(str(tiny_models["llama"]), [], EvalSettings(**SMALL), progress=False)
    r = CliRunner().invoke(main, ["eval", str(tiny_models["llama"]), "/nonexistent/x", "-q"])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_record_writes_fidelity_into_report_and_card(tiny_models, tmp_path):
    """eval --record: the card's Fidelity section states the measured KL (replaced, never
    duplicated, on a second run); a PoD card gains the section."""
    src = tiny_models["llama"]
    gqa = kvconvert.convert(str(src), str(tmp_path / "gqa"), kv_heads=2, **FAST)
    pod = kvconvert.convert(str(src), str(tmp_path / "pod"), target="pod", sink=2, recent=4, **FAST)
    assert "No fidelity measurement" in (gqa / "README.md").read_text()
    for _ in range(2):
        r = CliRunner().invoke(
            main, ["eval", str(src), str(gqa), str(pod), "--record", *SMALL_FLAGS]
        )
        assert r.exit_code == 0, r.output
    for out in (gqa, pod):
        measured = json.loads((out / "kvconvert.json").read_text())["evaluation"]
        card = (out / "README.md").read_text()
        assert card.count("## Fidelity") == 1 and "No fidelity measurement" not in card
        assert f"| kl nats per token | {measured['kl_nats_per_token']:.4g} |" in card
        assert "Measured by kvconvert eval" in card and measured["tokens"] == "2 x 16"
        for key in ("greedy_repeated_4grams", "original_greedy_distinct_2"):
            assert 0 <= measured[key] <= 1
            assert f"| {key.replace('_', ' ')} | {measured[key]:.4g} |" in card
    # the KV ratio is the one at --context: PoD's saving, which one token does not show
    pod_report = json.loads((pod / "kvconvert.json").read_text())
    orig = load(src)
    promised, _ = expected_bytes(pod_report, orig.config, 40, torch.float32)
    dense = kv_cache_bytes(orig, torch.zeros(1, 40, dtype=torch.long))
    ratio = pod_report["evaluation"]["kv_cache_ratio"]
    assert ratio < 1 and ratio == pytest.approx(promised / dense, abs=1e-4)
