"""Where PoD's loss comes from on a real model: KL of many layer maps, in one process (by hand).

Loads the original model and one PoD output of it (any map: only its weights and code are
used; each trial sets ``pod_map``, ``pod_sink`` and ``pod_recent`` on the loaded model's
config, which the PoD cache reads at every forward), caches the original's logits on the
evaluation text once, then measures KL(original || PoD), perplexity and top-1 agreement for:

- ``layers``: each layer alone borrowing its predecessor's keys (every KV head);
- ``heads``: each (layer, KV head) alone borrowing its predecessor's keys;
- ``window``: sink/recent pairs for one map (``--map FILE``);
- ``maps``: the maps in the given JSON files (``--map FILE ...``; a kvconvert.json or
  config.json works);
- ``drop``: for comparison with each map file, the original model where every head that
  the map makes borrow keys instead sees no distant token at all (only the sink and the
  recent window, as a StreamingLLM head; not something kvconvert writes).

The numbers are those ``kvconvert eval`` prints for the same text and settings (same
tokenisation, seed and KL code). Example (docs/pod.md, "Where the loss comes from"):

    kvconvert smol/model --target pod --pod-map id.json --sink 16 --recent 112 -o pod-id
    python benchmarks/pod_diagnose.py smol/model pod-id --data eval-austen.jsonl \
        --what layers --json layers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvconvert.calibration.data import load_documents, tokenize_documents, vocab_size
from kvconvert.evaluate import _kl_sum, _nll_sum
from kvconvert.pod.layermap import load_map


class Judge:
    """The original's logits on fixed tokens, cached; KL/perplexity/top-1 of candidates."""

    def __init__(self, original: torch.nn.Module, tokens: torch.Tensor, batch_size: int):
        self.tokens, self.batch_size = tokens, batch_size
        self.ref: list[torch.Tensor] = []
        nll = 0.0
        with torch.inference_mode():
            for b in self.batches():
                logits = original(input_ids=b).logits.float()
                nll += float(_nll_sum(logits, b))
                self.ref.append(logits)
        self.nll = nll / tokens[:, 1:].numel()

    def batches(self):
        for i in range(0, self.tokens.shape[0], self.batch_size):
            yield self.tokens[i : i + self.batch_size]

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        kl = nll = 0.0
        agree = 0
        for b, ref in zip(self.batches(), self.ref, strict=True):
            logits = model(input_ids=b).logits.float()
            kl += _kl_sum(ref, logits)
            nll += float(_nll_sum(logits, b))
            agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
        n = self.tokens.numel()
        return {
            "kl": kl / n,
            "ppl": math.exp(nll / self.tokens[:, 1:].numel()),
            "top1": agree / n,
        }


@contextlib.contextmanager
def drop_distant(model: torch.nn.Module, pod_map: list[list[int]], sink: int, recent: int):
    """Run ``model`` with every head that ``pod_map`` makes borrow restricted to its proximal
    keys (the first ``sink`` and the last ``recent`` positions): a per-head SDPA mask."""
    kv = len(pod_map[0])

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        row = pod_map[module.layer_idx]
        t, s = query.shape[2], key.shape[2]
        groups = query.shape[1] // kv
        qpos = torch.arange(s - t, s)[:, None]
        kpos = torch.arange(s)[None, :]
        causal = kpos <= qpos
        proximal = causal & ((kpos < sink) | (qpos - kpos <= recent))
        heads = [proximal if b != module.layer_idx else causal for b in row]
        mask = torch.stack([m for m in heads for _ in range(groups)])[None]
        return sdpa_attention_forward(
            module, query, key, value, mask.to(query.device), scaling=scaling
        )

    AttentionInterface.register("kvconvert_drop_distant", attention)
    AttentionMaskInterface.register("kvconvert_drop_distant", sdpa_mask)
    impl = model.config._attn_implementation
    model.set_attn_implementation("kvconvert_drop_distant")
    try:
        yield model
    finally:
        model.set_attn_implementation(impl)


def one_borrower(num_layers: int, kv: int, layer: int, head: int | None) -> list[list[int]]:
    rows = [[i] * kv for i in range(num_layers)]
    for h in range(kv) if head is None else [head]:
        rows[layer][h] = layer - 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("original")
    ap.add_argument("pod", help="a PoD output of the original (its weights are the original's)")
    ap.add_argument("--data", required=True, help="evaluation text (.jsonl/.txt)")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1234, help="kvconvert eval's default")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=112)
    ap.add_argument(
        "--what", choices=["layers", "heads", "window", "maps", "drop"], default="layers"
    )
    ap.add_argument("--map", nargs="*", default=[], help="map files (window, maps)")
    ap.add_argument("--windows", default="4:32,16:112,16:240,64:64,0:128")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    orig = AutoModelForCausalLM.from_pretrained(a.original, dtype=torch.float32).eval()
    pod = AutoModelForCausalLM.from_pretrained(
        a.pod, dtype=torch.float32, trust_remote_code=True
    ).eval()
    tok = AutoTokenizer.from_pretrained(a.original)
    vocab = vocab_size(json.loads((Path(a.original) / "config.json").read_text()))
    tokens = tokenize_documents(
        load_documents(a.data), tok, a.num_samples, a.seq_len, a.seed, vocab
    )
    judge = Judge(orig, tokens, a.batch_size)
    if a.what != "drop":
        del orig
    L, kv = pod.config.num_hidden_layers, pod.config.num_key_value_heads
    print(f"original perplexity {math.exp(judge.nll):.2f} ({time.perf_counter() - t0:.0f} s)")
    rows = []

    def trial(name: str, pod_map: list[list[int]], sink: int, recent: int) -> None:
        pod.config.pod_map, pod.config.pod_sink, pod.config.pod_recent = pod_map, sink, recent
        t = time.perf_counter()
        r = {"name": name, "sink": sink, "recent": recent, **judge(pod)}
        r["s"] = round(time.perf_counter() - t, 1)
        rows.append(r)
        print(
            f"{name:>24} sink {sink:>3} recent {recent:>4}: KL {r['kl']:.4f} "
            f"ppl {r['ppl']:.2f} top-1 {r['top1']:.3f} ({r['s']} s)",
            flush=True,
        )

    if a.what in ("layers", "heads"):
        for layer in range(1, L):
            for head in [None] if a.what == "layers" else range(kv):
                name = f"layer {layer}" + ("" if head is None else f" head {head}")
                trial(name, one_borrower(L, kv, layer, head), a.sink, a.recent)
    elif a.what == "window":
        pod_map = load_map(a.map[0], L, kv)
        for pair in a.windows.split(","):
            sink, recent = map(int, pair.split(":"))
            trial(Path(a.map[0]).parent.name or a.map[0], pod_map, sink, recent)
    elif a.what == "maps":  # an output's config.json brings its own sink and recent
        for f in a.map:
            cfg = json.loads(Path(f).read_text())
            cfg = cfg if isinstance(cfg, dict) else {}
            sink, recent = cfg.get("pod_sink", a.sink), cfg.get("pod_recent", a.recent)
            trial(Path(f).parent.name or f, load_map(f, L, kv), sink, recent)
    else:
        for f in a.map:
            t = time.perf_counter()
            with drop_distant(orig, load_map(f, L, kv), a.sink, a.recent):
                r = {"name": f"drop {f}", "sink": a.sink, "recent": a.recent, **judge(orig)}
            r["s"] = round(time.perf_counter() - t, 1)
            rows.append(r)
            print(f"drop {f}: KL {r['kl']:.4f} ppl {r['ppl']:.2f} top-1 {r['top1']:.3f}")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"original_ppl": math.exp(judge.nll), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
