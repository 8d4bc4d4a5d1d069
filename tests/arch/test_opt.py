"""OPT (no RoPE, MHA, biases): the real merge folds exactly; its GQA output waits for modeling
code (its PoD output: test_pod_mha.py)."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

import kvconvert
from kvconvert.errors import KVConvertError
from kvconvert.inspection import inspect_model
from tests.arch.models import fold_identity_in_place
from tests.conftest import FAST, token_ids


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(15)
    cfg = OPTConfig(
        vocab_size=96,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        init_std=0.1,
    )
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("opt") / "opt"
    model.save_pretrained(folder)
    return model, folder


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


def test_convert_refuses_and_inspect_describes(opt, tmp_path):
    _, folder = opt
    with pytest.raises(KVConvertError, match="--target gqa is not available"):
        kvconvert.convert(str(folder), str(tmp_path / "o"), kv_heads=2, **FAST)
    info = inspect_model(str(folder))
    assert info["targets"] == {"pod": "kvconvert"} and info["rope_layout"] == "none"
    assert info["rotary_dims"] == "0 of 16" and "out_proj" in info["attention"]
