"""Write a random-weight Llama checkpoint straight to safetensors shards (run by hand).

    python benchmarks/synthetic_llama.py OUT [--layers 26 --hidden 2048 --intermediate 6144
        --heads 16 --kv-heads 16 --vocab 32000 --dtype bfloat16 --shard-size 1GB]

No model is instantiated: each tensor is drawn (seeded), streamed into the shard writer and
dropped, so writing a 1.5B-parameter checkpoint needs one tensor of memory. The defaults give
about 1.55B parameters (3.1 GB in bf16); the folder loads with the stock ``LlamaForCausalLM``.
Also writes ``calibration.jsonl``: ``--calib-docs`` pre-tokenized documents of
``--calib-len`` random token ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvconvert.options import parse_size
from kvconvert.writer import ShardedWriter


def tensor_shapes(a: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM with these sizes, in checkpoint order."""
    d, hd = a.hidden, a.hidden // a.heads
    out = [("model.embed_tokens.weight", (a.vocab, d))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (a.heads * hd, d)),
            (p + "self_attn.k_proj.weight", (a.kv_heads * hd, d)),
            (p + "self_attn.v_proj.weight", (a.kv_heads * hd, d)),
            (p + "self_attn.o_proj.weight", (d, a.heads * hd)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (a.intermediate, d)),
            (p + "mlp.up_proj.weight", (a.intermediate, d)),
            (p + "mlp.down_proj.weight", (d, a.intermediate)),
        ]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (a.vocab, d))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output")
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=6144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--calib-docs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(a.seed)
    writer = ShardedWriter(out, parse_size(a.shard_size))
    params = 0
    for name, shape in tensor_shapes(a):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:  # scaled like initializer_range 0.02; o/down shrunk so the residual stays sane
            std = 0.02 / (2 * a.layers) ** 0.5 if ("o_proj" in name or "down" in name) else 0.02
            t = (torch.randn(shape, generator=gen) * std).to(dtype)
        params += t.numel()
        writer.add(name, t)
    writer.finish()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.hidden // a.heads,
        "vocab_size": a.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": a.dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with (out / "calibration.jsonl").open("w") as f:
        for _ in range(a.calib_docs):
            ids = torch.randint(3, a.vocab, (a.calib_len,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": ids}) + "\n")
    print(f"wrote {out}: {params / 1e9:.3f}B parameters in {a.dtype}")


if __name__ == "__main__":
    main()
