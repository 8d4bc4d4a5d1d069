"""Engines run the source model's layers over calibration data and stream the output's
tensors to a writer; what to measure and what to write is the target's (``kvconvert.target``).

- ``whole.py``: the whole model loaded once (every target).
- ``sequential.py``: one decoder layer at a time, resumable, under torchrun (targets that solve
  layer by layer from that layer's statistics).
"""
