"""Every output kind converted, loaded and run on a CUDA GPU (run by hand on a GPU machine).

    python benchmarks/cuda_check.py --model ../shared/models/stories260K

For each output kind (stock GQA, remote-code key projection, PoD, GQA + PoD) this script
1. converts on the GPU (``device="cuda"``) and on the CPU from the same pre-tokenized
   calibration (sampled once on the CPU), and compares the written tensors;
2. loads the GPU conversion on CUDA with SDPA in float32 and in bfloat16, and with eager
   attention on the CPU in float32, and compares their logits on the same tokens;
3. decodes 32 tokens greedily on CUDA with the cache, in float32 and bfloat16, and checks the
   float32 tokens against a cache-free recomputation (argmax of a full forward per step);
4. measures KL(original || converted) on CUDA and the KV cache bytes of a 256-token prefill.
Then it heals the stock GQA conversion for 50 steps on CUDA with bf16 autocast (the
``precision=auto`` default) and reports the KL before and after.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import kvconvert
from kvconvert.calibration.data import sample_from_model
from kvconvert.evaluate import kl_per_token, kv_cache_bytes
from kvconvert.heal import HealOptions, heal

POD = {"sink": 4, "recent": 32}  # small windows so that 256-token texts have distant tokens
KINDS = {
    "gqa (stock)": {"kv_heads": 2},
    "gqa --rope-keys project (remote code)": {"kv_heads": 2, "rope_keys": "project"},
    "pod (remote code)": {"target": "pod", "kv_saving": 0.3, **POD},
    "gqa,pod (remote code)": {"target": "gqa,pod", "kv_heads": 2, "kv_saving": 0.3, **POD},
}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load(folder: Path, device: str, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn, trust_remote_code=True
    )
    return model.to(device).eval()


@torch.inference_mode()
def greedy_no_cache(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    ids = prompt
    for _ in range(n):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1] :]


@torch.inference_mode()
def greedy_cache(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, prompt.shape[1] :]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/stories260K")
    ap.add_argument("--heal-steps", type=int, default=50)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    a = ap.parse_args()
    dev = a.device
    gpu_name = torch.cuda.get_device_name() if dev == "cuda" else "none (cpu dry run)"
    print(f"torch {torch.__version__}, GPU {gpu_name}")
    orig_cpu = AutoModelForCausalLM.from_pretrained(a.model).eval()
    evals = sample_from_model(orig_cpu, 1, 16, 256, 16, seed=1234)  # sampled on the CPU
    orig = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
    orig = orig.to(dev).eval()
    ev = evals.to(dev)
    prompt = evals[:2, :64].to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        # calibration sampled once on the CPU: both devices solve from the same tokens
        calib = Path(tmp) / "calibration.jsonl"
        ids = sample_from_model(orig_cpu, 1, 32, 256, 16, seed=0)
        calib.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in ids))
        for name, opts in KINDS.items():
            opts = {**opts, "calibration": str(calib)}
            gpu, cpu = Path(tmp) / f"{len(name)}-gpu", Path(tmp) / f"{len(name)}-cpu"
            t0 = time.perf_counter()
            kvconvert.convert(a.model, str(gpu), device=dev, progress=False, **opts)
            t_gpu = time.perf_counter() - t0
            kvconvert.convert(a.model, str(cpu), device="cpu", progress=False, **opts)
            tg, tc = tensors(gpu), tensors(cpu)
            assert tg.keys() == tc.keys()
            dev_diff = max((tg[k].float() - tc[k].float()).abs().max().item() for k in tg)
            m32 = load(gpu, dev, torch.float32, "sdpa")
            m16 = load(gpu, dev, torch.bfloat16, "sdpa")
            eager = load(gpu, "cpu", torch.float32, "eager")
            with torch.inference_mode():
                l32 = m32(input_ids=ev[:4]).logits.float()
                l16 = m16(input_ids=ev[:4]).logits.float()
                le = eager(input_ids=evals[:4]).logits.float()
            sdpa_vs_eager = (l32.cpu() - le).abs().max().item()
            bf16_err = (l16 - l32).abs().max().item()
            kl = kl_per_token(orig, m32, ev)
            kl16 = kl_per_token(orig, m16, ev)
            c32, ref = greedy_cache(m32, prompt, 32), greedy_no_cache(m32, prompt, 32)
            c16 = greedy_cache(m16, prompt, 32)
            agree16 = (c16 == c32).float().mean().item()
            kv = kv_cache_bytes(m16, ev[:1])
            kv0 = kv_cache_bytes(orig.to(torch.bfloat16), ev[:1])
            orig.float()
            print(
                f"{name}: convert on cuda {t_gpu:.1f} s; cuda vs cpu conversion max diff "
                f"{dev_diff:.2e}; logits cuda-sdpa-fp32 vs cpu-eager-fp32 max diff "
                f"{sdpa_vs_eager:.2e}; bf16 vs fp32 max diff {bf16_err:.3f}; KL to original "
                f"fp32 {kl:.4f}, bf16 {kl16:.4f} nats/token; cached greedy == uncached "
                f"(fp32): {bool((c32 == ref).all())}; bf16 cached tokens equal to fp32: "
                f"{agree16:.0%}; KV bytes (bf16, 1 x 256 tokens) {kv0} -> {kv}"
            )
            del m32, m16, eager
        conv = Path(tmp) / "heal-src"
        kvconvert.convert(a.model, str(conv), kv_heads=2, method="mean", progress=False)
        before = kl_per_token(orig_cpu, AutoModelForCausalLM.from_pretrained(conv).eval(), evals)
        out = Path(tmp) / "healed"
        t0 = time.perf_counter()
        heal(
            HealOptions(
                original=a.model,
                converted=str(conv),
                output=str(out),
                steps=a.heal_steps,
                device=dev,
            ),
            progress=False,
        )
        dt = time.perf_counter() - t0
        after = kl_per_token(orig_cpu, AutoModelForCausalLM.from_pretrained(out).eval(), evals)
        print(
            f"heal on cuda (bf16 autocast), mean init, {a.heal_steps} steps: KL {before:.3f} -> "
            f"{after:.3f} nats/token (CPU eval), {dt:.1f} s"
        )


if __name__ == "__main__":
    main()
