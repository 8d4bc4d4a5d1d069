"""Calibration sources to compare, written as pre-tokenized .jsonl files (run by hand;
docs/benchmarks.md, "Which calibration text").

    python benchmarks/calibration_sources.py smol/model OUT_DIR [--fortunes FILE]

Writes 32 x 256 token ids per source, each usable as ``kvconvert ... --calibration FILE``:

- ``self.jsonl``: what ``--calibration self`` samples (BOS, temperature 1, seed 0);
- ``fortunes.jsonl``: what ``--calibration FILE`` cuts from the fortunes text (seed 0);
- ``mix.jsonl``: the first 16 of each;
- ``chat.jsonl``: 32 user requests (below, none from the evaluation sets) in the model's chat
  template, each answer sampled at temperature 1 for 236 tokens (not stopped at the end of
  the turn), joined and cut into 256-token windows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvconvert.calibration.data import load_documents, sample_from_model, tokenize_documents

REQUESTS = [
    "How do I make a cup of green tea?",
    "Summarize the plot of a heist movie you invent.",
    "What are the main causes of inflation?",
    "Write a limerick about a cat who likes jazz.",
    "Explain how a bicycle gear works.",
    "Give me a packing list for a weekend camping trip.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "What is the difference between weather and climate?",
    "Describe a busy market in the morning.",
    "How can I improve my handwriting?",
    "Tell me a short story about a robot learning to paint.",
    "What should I consider when adopting a dog?",
    "Explain photosynthesis to a ten-year-old.",
    "Draft a polite email asking to reschedule a meeting.",
    "What are some good habits for studying?",
    "How does a refrigerator keep food cold?",
    "Write a haiku about autumn leaves.",
    "Compare trains and planes for a 500 km trip.",
    "What is a prime number? Give examples.",
    "Suggest a name for a bakery and explain why.",
    "How do vaccines train the immune system?",
    "Describe the rules of chess in a few sentences.",
    "Write a dialogue between a teacher and a student about homework.",
    "What are the benefits of learning a second language?",
    "How do I change a flat tire?",
    "Explain what an API is.",
    "Plan a three-day trip to a city of your choice.",
    "What makes a good team leader?",
    "Write a product description for a reusable water bottle.",
    "How do tides work?",
    "Give me a recipe for a simple vegetable soup.",
]
N, L, ANSWER = 32, 256, 236


def chat_windows(model, tok) -> torch.Tensor:
    """The requests' chat-templated prompts, each answer sampled at temperature 1, cut into
    (N, L) windows of the joined stream."""
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": r}], add_generation_prompt=True, tokenize=False
        )
        for r in REQUESTS
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=ANSWER,
            min_new_tokens=ANSWER,
            pad_token_id=tok.pad_token_id or 0,
        )
    real = torch.cat(
        [enc["attention_mask"], torch.ones(len(REQUESTS), ANSWER, dtype=torch.long)], 1
    )
    pairs = zip(out.tolist(), real.tolist(), strict=True)
    stream = [t for row, keep in pairs for t, k in zip(row, keep, strict=True) if k]
    return torch.tensor(stream[: N * L]).view(N, L)


def write(path: Path, rows: torch.Tensor) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": [int(x) for x in r]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--fortunes", help="default: calibration-fortunes.txt beside the model")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    fortunes = a.fortunes or str(Path(a.model).parent / "calibration-fortunes.txt")
    own = sample_from_model(model, model.config.bos_token_id, N, L, N, 0)
    cut = tokenize_documents(load_documents(fortunes), tok, N, L, 0, model.config.vocab_size)
    write(a.out / "self.jsonl", own)
    write(a.out / "fortunes.jsonl", cut)
    write(a.out / "mix.jsonl", torch.cat([own[: N // 2], cut[: N // 2]]))
    write(a.out / "chat.jsonl", chat_windows(model, tok))


if __name__ == "__main__":
    main()
