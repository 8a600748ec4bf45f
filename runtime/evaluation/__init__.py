"""Scoring checkpoints: benchmark tasks of lm-evaluation-harness (the held-out loss is stages/eval.py's)."""
