"""OPT (no RoPE, MHA, biases): the real merge folds exactly into the stock model.

The converted output (kvconvert's modeling code) is tested in test_remote_archs.py."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from kvconvert.inspection import inspect_model
from tests.conftest import load, token_ids
from tests.models import fold_identity_in_place


@pytest.fixture(scope="module")
def opt(remote_arch_models):
    folder = remote_arch_models["opt"]
    return load(folder), folder


@pytest.mark.parametrize("method", ["svd", "svd-weights"])
def test_identity_fold_reproduces_stock_logits(opt, method):
    model, _ = opt
    ids = token_ids(2, 40)
    folded = deepcopy(model)
    fold_identity_in_place(folded, "opt", method)
    with torch.inference_mode():
        torch.testing.assert_close(
            folded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_inspect_describes(opt):
    info = inspect_model(str(opt[1]))
    assert info["supported"] and info["targets"] == {"gqa": "kvconvert", "pod": "kvconvert"}
    assert info["rope_layout"] == "none"
    assert info["rotary_dims"] == "0 of 16" and "out_proj" in info["attention"]
