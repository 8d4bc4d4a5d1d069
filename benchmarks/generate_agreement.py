"""Does ``generate()`` decode an output as its own full forward does? (Run by hand.)

    python benchmarks/generate_agreement.py OUTPUT [OUTPUT ...] [--prompt 200] [--new 48]

For each output folder: a prompt sampled from the model itself (seeded; works for models that
ship token ids only, such as stories260K), then transformers' ``generate()`` for ``--new``
greedy tokens with the cache, compared token by token with the argmax of one uncached forward
over the generated sequence. Prints the agreement and the installed transformers version;
EOS, which ``min_new_tokens`` suppresses, is left out of the argmax. See docs/check.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM


@torch.inference_mode()
def agreement(folder: Path, prompt_len: int, new: int, seed: int) -> tuple[int, int]:
    config = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code="auto_map" in config)
    model.eval()
    bos, eos = config.get("bos_token_id") or 1, config.get("eos_token_id")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[bos]])
    for _ in range(prompt_len - 1):
        probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)[None]], 1)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=config.get("pad_token_id") or 0,
    )
    logits = model(input_ids=out, use_cache=False).logits[0, prompt_len - 1 : -1].float()
    if isinstance(eos, int):
        logits[:, eos] = float("-inf")
    return int((out[0, prompt_len:] == logits.argmax(-1)).sum()), new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outputs", nargs="+", type=Path)
    ap.add_argument("--prompt", type=int, default=200, help="prompt tokens")
    ap.add_argument("--new", type=int, default=48, help="generated tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for folder in args.outputs:
        same, n = agreement(folder, args.prompt, args.new, args.seed)
        print(
            f"{folder}: transformers {transformers.__version__}: {same}/{n} generated tokens "
            "equal the argmax of the uncached forward"
        )


if __name__ == "__main__":
    main()
