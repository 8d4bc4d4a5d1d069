"""Greedy answers of chat models to five fixed prompts, side by side (by hand).

    python benchmarks/chat_prompts.py ORIGINAL CONVERTED... [--new-tokens 40] [--json F]

The prompts are the ones quoted in docs/benchmarks.md: a fact, arithmetic, a list, a short
poem and a definition, so a converted or healed model's answers can be read against the
original's. Each model's own chat template formats the prompt; decoding is greedy, so the
answers are reproducible. Folders with kvconvert's model code load with
``trust_remote_code=True``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = (
    "What is the capital of France?",
    "What is 12 plus 7?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "Explain in one sentence what a computer is.",
)


@torch.inference_mode()
def answers(folder: str, new_tokens: int) -> list[str]:
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=True
    ).eval()
    out = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
        text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append(" ".join(text.split()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = {m: answers(m, args.new_tokens) for m in args.models}
    for i, prompt in enumerate(PROMPTS):
        print(f"\n## {prompt}")
        for m, got in table.items():
            print(f"- {Path(m).name}: {got[i]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"prompts": PROMPTS, "answers": table}, indent=1))


if __name__ == "__main__":
    main()
