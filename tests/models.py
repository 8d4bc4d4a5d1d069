"""Tiny seeded models of every supported family, from stock transformers configs: the one
place tests build models (nothing is downloaded; each is created with a fixed seed and saved
with ``save_pretrained``).

The Llama-layout families (``FAMILIES``) are the default test subjects: multi-head llama with
tied embeddings, grouped mistral, qwen2 with q/k/v biases. The other architectures each
exercise what their adapter is about: a fused qkv_proj with KV < H and partial rotary (phi3),
per-head q/k norms with non-trivial weights (qwen3), head_dim != hidden/heads (gemma),
soft-capping, query_pre_attn_scalar and sliding layers shorter than the test sequences
(gemma2), fused per-head qkv with partial rotary (gpt_neox), absolute positions with
project_in/out (opt; word_embed_proj_dim != hidden_size), a transposed Conv1D c_attn with
per-layer attention scaling and the upcast/reordered eager path (gpt2); biases made non-zero
wherever they exist.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2")
#: Sizes every tiny model shares (families and the other architectures alike).
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


def build_family(kind: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """One of ``FAMILIES`` (llama, mistral, qwen2), saved in ``dtype``."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = {k: v for k, v in COMMON.items() if k != "pad_token_id"}  # saved without one
    torch.manual_seed({"llama": 0, "mistral": 1, "qwen2": 2}[kind])
    if kind == "llama":  # multi-head attention: 4 query heads, 4 KV heads, tied embeddings
        model = LlamaForCausalLM(
            LlamaConfig(
                num_attention_heads=4,
                num_key_value_heads=4,
                head_dim=16,
                tie_word_embeddings=True,
                **common,
            )
        )
    elif kind == "mistral":  # already grouped: 8 query heads over 4 KV heads
        model = MistralForCausalLM(
            MistralConfig(
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=8,
                tie_word_embeddings=False,
                **common,
            )
        )
    else:  # qwen2: q/k/v biases, made non-zero so that dropping them would show
        model = Qwen2ForCausalLM(
            Qwen2Config(
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, **common
            )
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    model.to(dtype).save_pretrained(folder)
    return folder


#: gemma2's own features, all switched on: a head_dim of its own, query_pre_attn_scalar, a
#: sliding window shorter than the test sequences, and both soft-caps
GEMMA2 = dict(
    head_dim=24,
    query_pre_attn_scalar=24,
    sliding_window=8,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=10.0,
)
ARCHS = ("phi3", "qwen3", "gemma", "gemma2")
#: architectures whose GQA output loads through kvconvert's modeling code (remote code)
REMOTE_ARCHS = ("gpt_neox", "opt", "gpt2")
#: MHA architectures whose ``--target pod`` output is the stock class with PoD attention
POD_MHA_ARCHS = ("gpt_neox", "opt")
SEEDS = {"phi3": 10, "qwen3": 11, "gemma": 12, "gemma2": 13, "gpt_neox": 14, "opt": 15, "gpt2": 16}


def build(kind: str, folder: Path) -> Path:
    """Any family: ``FAMILIES`` or the other architectures (``ARCHS``, ``REMOTE_ARCHS``)."""
    if kind in FAMILIES:
        return build_family(kind, folder)
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
    elif kind == "gpt_neox":
        cfg = tf.GPTNeoXConfig(num_attention_heads=4, rotary_pct=0.25, **COMMON)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif kind == "opt":
        opt = {
            k: v for k, v in COMMON.items() if k not in ("intermediate_size", "initializer_range")
        }
        cfg = tf.OPTConfig(
            num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=32, init_std=0.1, **opt
        )
        model = tf.OPTForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=96,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=0.1,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "gemma2":
        cfg = tf.Gemma2Config(num_attention_heads=4, num_key_value_heads=4, **GEMMA2, **COMMON)
        model = tf.Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    if kind.startswith("gemma"):  # the stock init leaves Gemma's (1 + w) norms at 1: vary them
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    with torch.no_grad():  # the stock init zeroes biases: make dropping one show
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


def llama_deci_width(folder: Path) -> Path:
    """The tiny llama with an MLP of 256 (a multiple of 256, so DeciLM's ffn_mult expresses
    it): --format auto writes its per-layer outputs in the deci layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(17)
    common = {k: v for k, v in COMMON.items() if k != "pad_token_id"}
    cfg = LlamaConfig(
        **{**common, "intermediate_size": 256},
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def gemma2_4layer(folder: Path) -> Path:
    """A 4-layer gemma2 (sliding, full, sliding, full; 2 KV heads): a PoD block of layers 1 and
    3 skips the sliding layer 2."""
    import transformers as tf

    torch.manual_seed(14)
    cfg = tf.Gemma2Config(
        **{**COMMON, "num_hidden_layers": 4}, num_attention_heads=4, num_key_value_heads=2, **GEMMA2
    )
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2
    tf.Gemma2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def fold_identity_in_place(model: torch.nn.Module, model_type: str, method: str) -> None:
    """Merge every layer of a loaded model at identity (--kv-heads = its own count) through
    the adapter's split / merge_layer / join, and load the result back into ``model``.

    The weight-level path for architectures whose converted output needs kvconvert's modeling
    code: the stock class can still run an identity fold, which must not change the logits.
    """
    from kvconvert.arch import get_adapter
    from kvconvert.calibration.stats import StatsCollector
    from kvconvert.gqa.fold import AttentionWeights
    from kvconvert.gqa.layer import LayerShape, merge_layer, to_float64
    from tests.conftest import token_ids

    cfg = model.config.to_dict()
    a = get_adapter(model_type)
    h, kv, d = a.num_heads(cfg), a.num_kv_heads(cfg), a.head_dim(cfg)
    stats = None
    if method == "svd":
        with torch.inference_mode(), StatsCollector(model, a, cfg) as col:
            model(input_ids=token_ids(4, 32, seed=3), use_cache=False)
        stats = col.result()
    shape = LayerShape(h, kv, d, a.rope_pairs(cfg))
    sd = model.state_dict()
    new_sd = {}
    for i in range(a.num_layers(cfg)):
        names = a.layer_tensor_names(i)
        w = AttentionWeights.from_items(a.split({r: sd.get(n) for r, n in names.items()}, h, d))
        res = merge_layer(to_float64(w, "cpu"), stats[i] if stats else None, shape, kv, method)
        assert not torch.equal(res.weights.wk, w.wk.double())  # a real change of basis
        for role, t in a.join(res.weights.items(), d).items():
            if t is not None and names.get(role) in sd:
                new_sd[names[role]] = t.to(sd[names[role]].dtype)
    model.load_state_dict(new_sd, strict=False)
