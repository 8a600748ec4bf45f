"""One module per stage kind, each exposing `run(ctx) -> dict` of metrics (see registry.py)."""
