"""PoD on the real stories260K (skips if absent): sink 4, recent 32, T = 512, --kv-saving 0.15.

Reports the map, the saving measured on the real cache, KL to the original and decode speed
(``pytest -s`` shows them); asserts the measured saving equals the formula and the target.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

import kvconvert
from kvconvert.calibration.data import sample_from_model
from kvconvert.evaluate import kl_per_token, kv_cache_bytes
from tests.conftest import load


@torch.inference_mode()
def tokens_per_s(model, prompt: torch.Tensor, new: int) -> float:
    t0 = time.perf_counter()
    model.generate(input_ids=prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return new / (time.perf_counter() - t0)


def test_stories_kv_saving_015(stories, tmp_path):
    out = kvconvert.convert(
        str(stories),
        str(tmp_path / "pod"),
        target="pod",
        sink=4,
        recent=32,
        seq_len=512,
        num_samples=4,
        kv_saving=0.15,
        progress=False,
    )
    rep = json.loads((out / "kvconvert.json").read_text())
    orig, pod = load(stories), load(out, trust_remote_code=True)
    evals = sample_from_model(orig, 1, num_samples=2, seq_len=512, batch_size=2, seed=1234)
    measured = 1 - kv_cache_bytes(pod, evals[:1]) / kv_cache_bytes(orig, evals[:1])
    kl = kl_per_token(orig, pod, evals)
    speed = {m: tokens_per_s(x, evals[:1, :64], 192) for m, x in (("orig", orig), ("pod", pod))}
    print(
        f"\nstories260K PoD map {rep['target']['blocks']}; predicted saving "
        f"{rep['target']['predicted_kv_saving']:.2%}, measured {measured:.2%}; KL {kl:.3f} "
        f"nats/token; decode tok/s orig {speed['orig']:.0f}, PoD {speed['pod']:.0f}"
    )
    assert measured == pytest.approx(rep["target"]["predicted_kv_saving"], abs=1e-6)
    assert 0.15 <= measured < 0.2
    assert 0 < kl < 5
