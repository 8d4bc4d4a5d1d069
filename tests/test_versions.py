"""The supported transformers range is one fact, kept in one place, and outputs record it.

CI runs this file under the newest and the oldest supported transformers (``.ci/run``).
"""

from __future__ import annotations

import json
import re
import warnings

import torch
import transformers
from packaging.version import Version

import kvconvert
from kvconvert.compat import (
    CACHE_ARG,
    CACHE_FIELD,
    NEWEST_TESTED_TRANSFORMERS,
    OLDEST_TRANSFORMERS,
    cache_kwargs,
    output_cache,
)
from tests.conftest import FAST, ROOT, load, token_ids


def test_lower_bound_is_the_oldest_ci_tests():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"transformers>={OLDEST_TRANSFORMERS},<6"' in pyproject
    assert "OLDEST_TRANSFORMERS" in (ROOT / ".ci/run").read_text()
    installed = Version(transformers.__version__)
    assert Version(OLDEST_TRANSFORMERS) <= installed < Version("6")


def test_cache_name_matches_the_installed_version():
    """Both sides of the 5.24 rename: the name kvconvert passes is the one transformers reads,
    without a deprecation warning, and the cache comes back."""
    renamed = Version(transformers.__version__) >= Version("5.24")
    assert CACHE_ARG == CACHE_FIELD == ("cache" if renamed else "past_key_values")
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    ids = token_ids(1, 6, vocab=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            first = model(input_ids=ids[:, :5], use_cache=True)
            cache = output_cache(first)
            step = model(input_ids=ids[:, 5:], use_cache=True, **cache_kwargs(cache))
            full = model(input_ids=ids, use_cache=False)
    assert cache is not None and cache.get_seq_length() == 6
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)


def test_output_records_transformers_version(tiny_models, tmp_path):
    out = kvconvert.convert(str(tiny_models["llama"]), str(tmp_path / "o"), kv_heads=2, **FAST)
    config = json.loads((out / "config.json").read_text())
    assert config["transformers_version"] == transformers.__version__
    card = (out / "README.md").read_text()
    tested = f"transformers {OLDEST_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS}"
    assert tested in card and "kvconvert check" in card
    assert re.search(r"Written with transformers \d+\.\d+", card)
    load(out)  # and the stock class reads the stamped config
