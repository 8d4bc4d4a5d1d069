"""Calibration: token batches in (data.py), second-moment statistics out (stats.py)."""
