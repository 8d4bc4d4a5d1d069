"""The model card: Hub front matter (base model, licence from the source), body, load snippet."""

from __future__ import annotations

import json
import shutil

import yaml

import kvconvert
from kvconvert.gqa.card import model_card
from tests.conftest import FAST

SOURCE_CARD = """---
license: other
license_name: llama3
license_link: LICENSE
language: [en]
tags: [facebook]
---
# The source model
"""


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_carries_licence_and_says_what_was_done(tiny_models, tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"  # the Hub cache's snapshot layout
    src = tmp_path / "models--org--tiny-mistral" / "snapshots" / commit
    shutil.copytree(tiny_models["mistral"], src)
    (src / "README.md").write_text(SOURCE_CARD)
    (src / "LICENSE").write_text("the licence text")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(src))
    out = kvconvert.convert(
        "org/tiny-mistral", str(tmp_path / "o"), kv_heads=2, method="mean", progress=False
    )
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "org/tiny-mistral" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["tags"] == ["kvconvert", "gqa"]
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other",
        "llama3",
        "LICENSE",
    )
    assert meta["language"] == ["en"] and "facebook" not in meta["tags"]
    assert (out / "LICENSE").read_text() == "the licence text"
    report = json.loads((out / "kvconvert.json").read_text())
    kvb = report["kv_bytes_per_token"]
    assert f"{kvb['before']:,} bytes -> {kvb['after']:,} bytes (50% smaller)" in card
    assert "KV heads per layer: 4 -> 2" in card and "merge `mean`" in card
    assert "No fidelity measurement" in card and "trust_remote_code" not in card
    assert report["command"] in card and (out / "recipe.yaml").read_text().strip() in card
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"] == "org/tiny-mistral" and recipe["revision"] == commit  # pinned


def fake_report(**extra) -> dict:
    return {
        "command": "kvconvert org/m --kv-heads 2 -o out",
        "recipe": {
            "target": "gqa",
            "method": "svd",
            "rope_keys": "complex",
            "objective": "output",
            "grouping": "adjacent",
        },
        "versions": {"kvconvert": "0.1.0"},
        "source": {
            "model": "org/m",
            "num_key_value_heads": 8,
            "num_attention_heads": 32,
            "num_layers": 2,
        },
        "target": {"kind": "gqa", "num_key_value_heads": [4, 2]},
        "kv_bytes_per_token": {"before": 8192, "after": 3072, "dtype": "bfloat16"},
        "layers": [],
        **extra,
    }


def test_card_shows_recorded_fidelity_per_layer_heads_and_remote_code():
    report = fake_report(fidelity={"kl_nats_per_token": 0.01234, "ppl_before": 5.5, "n": 16})
    card = model_card(report, "org/m", remote_code=True)
    assert "| kl nats per token | 0.01234 |" in card and "| ppl before | 5.5 |" in card
    assert "4/2 KV heads (from 8)" in card and "8,192 bytes -> 3,072 bytes (62% smaller)" in card
    assert "from_pretrained(repo, trust_remote_code=True)" in card and "auto_map" in card
    assert "license" not in front_matter(card)  # nothing to carry: no licence invented


def test_local_source_path_never_published(tiny_models, tmp_path):
    """A card (GQA and PoD) names a local source by its folder only; base_model comes from
    --base-model or from the Hub id the folder's config records, never from a path."""
    src = tmp_path / "private" / "home" / "tiny-src"
    shutil.copytree(tiny_models["llama"], src)
    out = tmp_path / "outputs" / "kv2"
    kvconvert.convert(str(src), str(out), kv_heads=2, method="mean", progress=False)
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "tiny-src" in card
    assert "base_model" not in front_matter(card)

    config = json.loads((src / "config.json").read_text())
    config["_name_or_path"] = "someorg/tiny-llama"  # saved from a Hub model
    (src / "config.json").write_text(json.dumps(config))
    pod = tmp_path / "outputs" / "pod"
    kvconvert.convert(
        str(src),
        str(pod),
        target="pod",
        sink=2,
        recent=8,
        kv_saving=0.1,
        seq_len=32,
        num_samples=4,
        progress=False,
    )
    card = (pod / "README.md").read_text()
    assert str(tmp_path) not in card and front_matter(card)["base_model"] == "someorg/tiny-llama"

    given = tmp_path / "outputs" / "given"
    kvconvert.convert(
        str(src), str(given), kv_heads=2, method="mean", base_model="org/name", progress=False
    )
    card = (given / "README.md").read_text()
    assert str(tmp_path) not in card and front_matter(card)["base_model"] == "org/name"


def test_pod_card_has_the_gqa_cards_sections(tiny_models, tmp_path):
    """A PoD card is no thinner than a GQA card: licence carried over, Fidelity, How to load,
    Reproduce with the full recipe."""
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    out = kvconvert.convert(str(src), str(tmp_path / "pod"), target="pod", sink=2, recent=4, **FAST)
    card = (out / "README.md").read_text()
    assert front_matter(card)["license"] == "apache-2.0"
    for section in ("## Fidelity", "## How to load", "## Reproduce", "```yaml"):
        assert section in card, section
    recipe = (out / "recipe.yaml").read_text()
    assert f"model: {src}" in recipe  # reruns from anywhere; the card names the folder only
    assert "target: pod" in card and "model: src" in card and str(tmp_path) not in card
