"""Tiny seeded models of the non-Llama architectures, from stock transformers configs.

Each one exercises what its adapter is about: a fused qkv_proj with KV < H and partial rotary
(phi3), per-head q/k norms with non-trivial weights (qwen3), head_dim != hidden/heads (gemma),
soft-capping, query_pre_attn_scalar and sliding layers shorter than the test sequences (gemma2).
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.1,
)
ARCHS = ("phi3", "qwen3", "gemma", "gemma2")
SEEDS = {"phi3": 10, "qwen3": 11, "gemma": 12, "gemma2": 13}


def build(kind: str, folder: Path) -> Path:
    import transformers as tf

    torch.manual_seed(SEEDS[kind])
    if kind == "phi3":
        cfg = tf.Phi3Config(
            num_attention_heads=8,
            num_key_value_heads=4,
            partial_rotary_factor=0.5,
            tie_word_embeddings=False,
            **COMMON,
        )
        model = tf.Phi3ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(num_attention_heads=4, num_key_value_heads=4, head_dim=16, **COMMON)
        model = tf.Qwen3ForCausalLM(cfg)
        with torch.no_grad():  # non-trivial per-head norm weights (stock init is all ones)
            for name, p in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.uniform_(0.3, 2.0)
    elif kind == "gemma":
        cfg = tf.GemmaConfig(num_attention_heads=4, num_key_value_heads=4, head_dim=32, **COMMON)
        model = tf.GemmaForCausalLM(cfg)
    else:
        cfg = tf.Gemma2Config(
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=24,
            query_pre_attn_scalar=24,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
            **COMMON,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    if kind.startswith("gemma"):  # the stock init leaves Gemma's (1 + w) norms at 1: vary them
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder
