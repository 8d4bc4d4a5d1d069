"""``kvconvert demo``: the whole pipeline offline, on a small seeded Llama-layout model.

Writes ``DIR/source`` (a random but seeded Llama checkpoint, 8 query and 8 KV heads), converts
it to 4 KV heads with self-calibration into ``DIR/converted``, and reports KV bytes per token
and the KL to the original for the merge and for the mean-pooling baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .calibration.data import sample_from_model
from .evaluate import kl_per_token, kv_cache_bytes
from .loading import quiet_libraries
from .pipeline import convert
from .recipe import Recipe


def write_demo_model(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.08,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def run_demo(output: str | Path, kv_heads: int = 4, progress: bool = True) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    out = Path(output)
    if not progress:
        quiet_libraries()
    src = write_demo_model(out / "source")
    results = {}
    for method in ("svd", "mean"):
        dst = out / ("converted" if method == "svd" else "converted-mean")
        convert(
            Recipe(
                model=str(src),
                output=str(dst),
                kv_heads=kv_heads,
                method=method,
                num_samples=16,
                seq_len=128,
                overwrite=True,
            ),
            progress=progress,
        )
        results[method] = dst
    orig = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = sample_from_model(orig, 1, num_samples=8, seq_len=128, batch_size=8, seed=1234)
    summary = {"kv_bytes_per_token_before": kv_cache_bytes(orig, ids[:1, :1])}
    for method, dst in results.items():
        conv = AutoModelForCausalLM.from_pretrained(dst).eval()
        summary[f"kl_{method}"] = kl_per_token(orig, conv, ids)
        summary["kv_bytes_per_token_after"] = kv_cache_bytes(conv, ids[:1, :1])
    return summary
