"""Captured attention samples of a batch run in pieces join back into that batch."""

from __future__ import annotations

import torch

from kvconvert.calibration.samples import AttentionSamples


def test_pieces_join_into_their_batch_even_when_two_sequences_are_equal():
    """A calibration set may hold the same sequence twice: its pieces' hidden states must
    still add up to the batch, while what every piece shares (cos and sin) stays one tensor."""
    x = torch.randn(1, 8, 4)
    cos, sin = torch.randn(1, 8, 2), torch.randn(1, 8, 2)
    got = AttentionSamples()
    for piece in (x, x.clone()):  # one sequence a piece, the same twice
        kw = {"hidden_states": piece, "position_embeddings": (cos, sin), "attention_mask": None}
        got.kwargs.append(kw)
        got.outputs.append(2 * piece)
    got.join_last(2)
    assert len(got.kwargs) == len(got.outputs) == 1
    joined = got.kwargs[0]
    assert joined["hidden_states"].shape == (2, 8, 4) == got.outputs[0].shape
    torch.testing.assert_close(got.outputs[0], 2 * joined["hidden_states"])
    assert joined["position_embeddings"][0] is cos and joined["attention_mask"] is None
