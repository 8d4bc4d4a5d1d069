"""On the real pretrained stories260K, the merge must beat mean-pooling (skips if absent)."""

from __future__ import annotations

import kvconvert
from kvconvert.calibration.data import sample_from_model
from kvconvert.evaluate import kl_per_token
from tests.conftest import load


def test_svd_complex_output_beats_mean(stories, tmp_path):
    orig = load(stories)
    evals = sample_from_model(orig, 1, num_samples=8, seq_len=128, batch_size=8, seed=1234)
    kl = {}
    for method in ("mean", "svd"):
        out = kvconvert.convert(
            str(stories),
            str(tmp_path / method),
            kv_heads=2,
            method=method,
            num_samples=16,
            seq_len=128,
            progress=False,
        )
        kl[method] = kl_per_token(orig, load(out), evals)
    assert kl["svd"] < kl["mean"] - 0.2, kl
