"""Layer maps from similarities, saving targets and files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvconvert.errors import KVConvertError
from kvconvert.pod.layermap import (
    bias_per_head,
    blocks_for_saving,
    blocks_from_threshold,
    describe,
    load_map,
    num_blocks,
    predicted_saving,
)

# 5 layers, 2 KV heads: similarity[l, h] is between layers l and l + 1
SIM = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.95, 0.6]])


def test_threshold_blocks():
    assert blocks_from_threshold(SIM, 0.5) == [[0, 0], [0, 1], [0, 2], [3, 2], [3, 2]]
    assert describe(blocks_from_threshold(SIM, 0.5)) == "h0: 0-2 3-4; h1: 0 1 2-4"
    assert blocks_from_threshold(SIM, 0.5, max_block=2) == [[0, 0], [0, 1], [2, 2], [3, 2], [3, 4]]
    assert blocks_from_threshold(SIM, 0.5, keep_first=2)[:2] == [[0, 0], [1, 1]]
    assert blocks_from_threshold(SIM, 0.99) == [[i, i] for i in range(5)]


def test_saving_formula():
    pod_map = [[0, 0], [0, 1], [0, 2], [3, 2], [3, 2]]
    assert num_blocks(pod_map) == 5
    assert predicted_saving(pod_map, 4, 32, 512) == pytest.approx(0.5 * (1 - 5 / 10) * 476 / 512)
    assert predicted_saving(pod_map, 4, 32, 30) == 0.0


def test_saving_target_takes_most_similar_first():
    # 0.95 (layer 4, head 0) then 0.9 (layer 1, head 0) ...
    one = blocks_for_saving(SIM, 0.04, sink=0, recent=0, context=100)
    assert one == [[0, 0], [1, 1], [2, 2], [3, 3], [3, 4]]  # one merge: 1/2 * 1/10 = 5%
    two = blocks_for_saving(SIM, 0.06, sink=0, recent=0, context=100)
    assert num_blocks(two) == 8 and two[4][0] == 3 and two[1][0] == 0
    capped = blocks_for_saving(SIM, 0.2, sink=0, recent=0, context=100, max_block=2)
    sizes = [[row[h] for row in capped].count(b) for h in range(2) for b in range(5)]
    assert max(sizes) == 2 and num_blocks(capped) < 10
    with pytest.raises(KVConvertError, match="cannot be reached.*at most 40.0%"):
        blocks_for_saving(SIM, 0.45, sink=0, recent=0, context=100)


def test_map_files(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps([0, 0, 2]))
    assert load_map(f, 3, 2) == [[0, 0], [0, 0], [2, 2]]
    f.write_text(json.dumps({"pod_map": [[0, 0], [0, 1], [0, 1]]}))
    assert load_map(f, 3, 2) == [[0, 0], [0, 1], [0, 1]]
    f.write_text(json.dumps([[0, 0], [1, 1], [0, 1]]))  # layer 2 skips layer 1's block
    with pytest.raises(KVConvertError, match="consecutive"):
        load_map(f, 3, 2)
    with pytest.raises(KVConvertError, match="needs 4 rows"):
        load_map(f, 4, 2)


def test_bias_per_head_counts_links_over_sliding_layers():
    """bias[l, h, d - 1] is read d links down the chain of full-attention layers: with layer
    2 sliding, layer 3 borrowing from layer 1 is one link down, from layer 0 two."""
    windows = [None, None, 8, None]
    bias = np.zeros((4, 2, 3))
    bias[3, 0, 0], bias[3, 1, 1], bias[1, 1, 0] = -1.0, -4.0, -2.0
    pod_map = [[0, 0], [1, 0], [2, 2], [1, 0]]
    assert bias_per_head(pod_map, bias, windows) == [
        [0.0, 0.0],
        [0.0, -2.0],
        [0.0, 0.0],
        [-1.0, -4.0],
    ]
