"""Structured pruning: calibration scores, what to keep, the checkpoint rewrite, its check."""
