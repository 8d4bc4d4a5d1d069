"""PoD on each tiny non-Llama architecture (run by hand).

    PYTHONPATH=. python benchmarks/pod_arch.py [--out DIR]

For every architecture in tests/arch/models.py (ARCHS and the PoD-only MHA ones, gpt_neox and
opt; plus a 4-layer gemma2: sliding, full, sliding, full): max |logit difference| of the
identity-map PoD output (``convert --pod-map``) against the stock model (prefill and
token-by-token decode, eager and sdpa), and for a real map (``--kv-saving 0.15``, sink 2,
recent 4, calibrated on 4 x 32 self-sampled tokens) the map, the predicted saving and the
saving measured on the real cache objects after a 40-token prefill, against the stock cache.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import kvconvert
from kvconvert.evaluate import kv_cache_bytes
from tests.conftest import load, token_ids
from tests.models import ARCHS, POD_MHA_ARCHS, build, gemma2_4layer
from tests.pod.test_modeling import decode_logits

POD = {"sink": 2, "recent": 4, "seq_len": 32, "num_samples": 4, "progress": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="kvc-pod-arch-"))
    ids = token_ids(2, 24)
    srcs = {k: build(k, root / k) for k in ARCHS + POD_MHA_ARCHS}
    srcs["gemma2-4layer"] = gemma2_4layer(root / "gemma2-4layer")
    print("arch           impl   identity max|dlogit| prefill / decode")
    for kind, src in srcs.items():
        cfg = json.loads((src / "config.json").read_text())
        identity = root / f"{kind}-identity.json"
        identity.write_text(json.dumps(list(range(cfg["num_hidden_layers"]))))
        out = kvconvert.convert(
            str(src), str(root / f"{kind}-id"), target="pod", pod_map=str(identity), **POD
        )
        for impl in ["eager"] if kind.startswith("gemma2") else ["eager", "sdpa"]:
            pod = load(out, trust_remote_code=True, attn_implementation=impl)
            with torch.inference_mode():
                want = load(src, attn_implementation=impl)(input_ids=ids).logits
                pre = (pod(input_ids=ids).logits - want).abs().max().item()
            dec = (decode_logits(pod, ids, 5) - want).abs().max().item()
            print(f"{kind:14s} {impl:6s} {pre:.2e} / {dec:.2e}")
    print("\narch           map (--kv-saving 0.15)             predicted  measured (40 tokens)")
    for kind, src in srcs.items():
        if kind == "gemma2":
            continue  # 2 layers, layer 0 slides: nothing may share
        out = kvconvert.convert(
            str(src), str(root / f"{kind}-pod"), target="pod", kv_saving=0.15, context=40, **POD
        )
        rep = json.loads((out / "kvconvert.json").read_text())
        x = token_ids(2, 40)
        measured = 1 - kv_cache_bytes(load(out, trust_remote_code=True), x) / kv_cache_bytes(
            load(src), x
        )
        tgt = rep["target"]
        print(f"{kind:14s} {tgt['blocks']:34s} {tgt['predicted_kv_saving']:.2%}     {measured:.2%}")


if __name__ == "__main__":
    main()
