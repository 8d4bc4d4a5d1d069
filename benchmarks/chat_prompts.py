"""Greedy answers of chat models to fixed prompts, side by side (by hand).

    python benchmarks/chat_prompts.py ORIGINAL CONVERTED... [--new-tokens 60] [--json F]
                                      [--markdown F] [--no-stories]

The prompts are the ones quoted in docs/benchmarks.md: a fact, arithmetic, a list, a short
poem and a definition, each through the model's own chat template, then two story openings
continued as plain text (where greedy loops show first). Decoding is greedy, so the answers are
reproducible. ``--markdown`` writes the table docs/benchmarks.md shows (one row per prompt, one
column per model, and a last row with each model's share of repeated 4-grams over all its
answers, kvconvert eval's rep-4). Folders with kvconvert's model code load with
``trust_remote_code=True``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvconvert import repetition

PROMPTS = (
    "What is the capital of France?",
    "What is 12 plus 7?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "Explain in one sentence what a computer is.",
)
STORIES = repetition.STORIES[:2]  # the first two of kvconvert eval's story openings


@torch.inference_mode()
def answers(
    folder: str, new_tokens: int, stories: bool = True
) -> tuple[list[str], list[list[int]]]:
    """Each prompt's answer as text, and its new token ids."""
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=True
    ).eval()
    out, ids_out = [], []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
        new = gen[0, ids["input_ids"].shape[1] :]
        out.append(" ".join(tok.decode(new, skip_special_tokens=True).split()))
        ids_out.append(new.tolist())
    for story in STORIES if stories else ():
        ids = tok(story, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
        new = gen[0, ids["input_ids"].shape[1] :]
        out.append("... " + " ".join(tok.decode(new, skip_special_tokens=True).split()))
        ids_out.append(new.tolist())
    return out, ids_out


def markdown(prompts: list[str], table: dict[str, tuple[list[str], list[list[int]]]]) -> str:
    """One row per prompt, one column per model (the first is the original); the last row is
    each model's rep-4."""
    names = ["original", *(Path(m).name for m in list(table)[1:])]
    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, prompt in enumerate(prompts):
        cells = [got[0][i].replace("|", "\\|") for got in table.values()]
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    shares = [repetition.repetition(got[1])["repeated_4grams"] for got in table.values()]
    lines.append("| repeated 4-grams | " + " | ".join(f"{r:.0%}" for r in shares) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--new-tokens", type=int, default=60)
    ap.add_argument("--no-stories", action="store_true", help="the chat prompts only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="write the table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = {m: answers(m, args.new_tokens, not args.no_stories) for m in args.models}
    prompts = list(PROMPTS) + ([] if args.no_stories else list(STORIES))
    for i, prompt in enumerate(prompts):
        print(f"\n## {prompt}")
        for m, got in table.items():
            print(f"- {Path(m).name}: {got[0][i]}")
    if args.json:
        answers_only = {m: got[0] for m, got in table.items()}
        doc = {"prompts": prompts, "answers": answers_only}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(prompts, table))


if __name__ == "__main__":
    main()
