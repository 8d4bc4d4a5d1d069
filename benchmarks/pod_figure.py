"""The picture in docs/pod.md: similarity, borrowing cost and per-layer KL of one model.

    python benchmarks/pod_figure.py OUT/kvconvert.json layers.json docs/pod-smollm2.png

``OUT`` is a ``--target pod --kv-saving F`` output (its report holds both the similarity
matrix and the borrowing costs); ``layers.json`` is ``benchmarks/pod_diagnose.py --what
layers --json``'s output (each layer alone borrowing its predecessor's keys).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def matrix(rows: list) -> np.ndarray:
    return np.array(rows, dtype=float)  # None -> nan


def main() -> None:
    report, layers, out = sys.argv[1:4]
    rep = json.loads(Path(report).read_text())
    sim = matrix(rep["similarity"]["matrix"])  # (L - 1, KV): layers (l - 1, l)
    cost = matrix(rep["borrow_cost"]["matrix"])[1:, :, 0]  # (L - 1, KV): l reads l - 1
    kl = [r["kl"] for r in json.loads(Path(layers).read_text())["rows"]]
    upper = np.arange(1, sim.shape[0] + 1)
    fig, ax = plt.subplots(1, 3, figsize=(10, 5), sharey=True)
    for a, data, title in (
        (ax[0], sim, "1 - JSD of distant attention\n(layers l - 1, l)"),
        (ax[1], cost, "borrowing cost\n(l reads l - 1's keys)"),
    ):
        im = a.imshow(
            data,
            aspect="auto",
            cmap="viridis",
            extent=(-0.5, data.shape[1] - 0.5, upper[-1] + 0.5, upper[0] - 0.5),
        )
        a.set_title(title, fontsize=9)
        a.set_xlabel("KV head")
        a.set_xticks(range(data.shape[1]))
        fig.colorbar(im, ax=a, fraction=0.05)
    ax[0].set_ylabel("layer l")
    ax[2].barh(upper, kl, color="tab:red")
    ax[2].set_title("KL on held-out text when only\nlayer l borrows (every head)", fontsize=9)
    ax[2].set_xlabel("nats/token")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main()
