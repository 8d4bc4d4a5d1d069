"""Identity and halved-KV conversion of each tiny non-Llama architecture (run by hand).

    PYTHONPATH=. python benchmarks/arch_identity.py [--out DIR]

For every architecture in tests/arch/models.py: max |logit difference| of the identity
conversion (--kv-heads = the model's own count) for the methods svd and mean, and for a
halved-KV conversion the KL to the original (nats/token) and the measured KV cache bytes.
gpt_neox and opt outputs load through kvconvert's modeling code (trust_remote_code=True).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import kvconvert
from kvconvert.evaluate import kl_per_token, kv_cache_bytes
from tests.conftest import FAST, load, token_ids
from tests.models import ARCHS, REMOTE_ARCHS, build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="kvc-arch-"))
    ids = token_ids(2, 40)
    print("arch    method  identity max|dlogit|   halved: KL nats/tok  KV bytes before->after")
    for kind in ARCHS + REMOTE_ARCHS:
        src = build(kind, root / kind)
        orig = load(src)
        kv = getattr(orig.config, "num_key_value_heads", None) or orig.config.num_attention_heads
        with torch.inference_mode():
            ref = orig(input_ids=ids).logits
        for method in ("svd", "mean"):
            out = kvconvert.convert(
                str(src), str(root / f"{kind}-{method}-id"), kv_heads=kv, method=method, **FAST
            )
            with torch.inference_mode():
                conv = load(out, trust_remote_code=True)
                err = (conv(input_ids=ids).logits - ref).abs().max().item()
            half = kvconvert.convert(
                str(src),
                str(root / f"{kind}-{method}-half"),
                kv_heads=kv // 2,
                method=method,
                **FAST,
            )
            conv = load(half, trust_remote_code=True)
            kl = kl_per_token(orig, conv, ids)
            b0, b1 = kv_cache_bytes(orig, ids), kv_cache_bytes(conv, ids)
            print(
                f"{kind:7s} {method:6s}  {err:.2e}              {kl:.4f}               {b0}->{b1}"
            )


if __name__ == "__main__":
    main()
