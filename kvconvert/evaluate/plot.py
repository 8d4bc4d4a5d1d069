"""``--plot``: KL against the measured KV cache, and per-layer heatmaps (matplotlib, an
optional dependency: ``kvconvert[plot]``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import KVConvertError
from .table import short_name


def write_plot(doc: dict[str, Any], path: str | Path) -> None:
    """Save ``plot_figure(doc)`` as an image (``--plot``)."""
    plt = require_matplotlib()
    fig = plot_figure(doc)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_figure(doc: dict[str, Any]) -> Any:
    """KL vs the KV cache measured at the evaluation context for every model (a legend names
    them, so labels never overlap; bytes at a context show savings that grow with length,
    such as PoD's), and one heatmap of per-layer values per conversion, all on one colour
    scale."""
    plt = require_matplotlib()
    models = doc["models"]
    ctx = doc["settings"]["context"]
    maps = [m for m in models if m["conversion"] and _layer_matrix(m["conversion"])[0]]
    ncols = min(max(len(maps), 1), 3)
    nrows = 1 + math.ceil(len(maps) / ncols)
    width = max(4.2 * ncols, 8.0)
    fig = plt.figure(figsize=(width, 3.8 + 2.6 * (nrows - 1)), constrained_layout=True)
    grid = fig.add_gridspec(nrows, ncols, height_ratios=[1.4] + [1] * (nrows - 1))
    ax = fig.add_subplot(grid[0, :])
    for m in models:
        orig = m["role"] == "original"
        label = short_name(m["name"]) + (" (original)" if orig else "")
        x, y = m["kv_bytes_at_context"] / 2**20, m["kl"]
        ax.scatter(x, y, s=90 if orig else 45, marker="*" if orig else "o", zorder=3, label=label)
    ax.set_xlabel(f"KV cache MiB at {ctx} tokens (measured after a prefill of {ctx})")
    ax.set_ylabel("KL(original || model)\nnats/token")
    ax.set_title("Fidelity vs KV cache size")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    mats = [_layer_matrix(m["conversion"]) for m in maps]
    top = max((v for _, mat in mats for _, v in _cells_of(mat)), default=1.0) or 1.0
    images = []
    for k, (m, (rows, mat)) in enumerate(zip(maps, mats, strict=True)):
        a = fig.add_subplot(grid[1 + k // ncols, k % ncols])
        images.append(a.imshow(mat, aspect="auto", cmap="magma_r", vmin=0, vmax=top))
        a.set_yticks(range(len(rows)), rows, fontsize=8)
        a.set_xticks(range(len(mat[0])))
        if len(mat[0]) <= 16:
            for (r, c), v in _cells_of(mat):
                ink = "white" if v > 0.5 * top else "black"
                a.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color=ink)
        a.set_xlabel("layer")
        a.set_title(short_name(m["name"]), fontsize=9)
    if images:
        axes = [im.axes for im in images]
        fig.colorbar(images[0], ax=axes, shrink=0.8, label="per-layer value (one scale)")
    return fig


def _layer_matrix(conv: dict[str, Any]) -> tuple[list[str], list[list[float]]]:
    """Numeric per-layer fields of kvconvert.json (errors, PoD similarities) as a matrix."""
    layers = conv.get("layers") or []
    keys = sorted(
        {
            k
            for layer in layers
            for k, v in layer.items()
            if k != "layer" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    mat = [[float(layer.get(k, float("nan"))) for layer in layers] for k in keys]
    return keys, mat


def _cells_of(mat: list[list[float]]) -> list[tuple[tuple[int, int], float]]:
    return [((r, c), v) for r, row in enumerate(mat) for c, v in enumerate(row) if v == v]


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or one clear error
    saying how to install it (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KVConvertError(
            "--plot needs matplotlib: pip install matplotlib (or kvconvert[plot])"
        ) from None
    return plt
