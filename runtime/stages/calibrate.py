"""The `calibrate` stage: scores of a model over calibration batches -> stats.safetensors, summary.json.

A thin reader of the plan's config; the hooks and scores live in runtime/surgery/calibrate.py.
"""

from __future__ import annotations

import torch

from ..surgery.calibrate import calibrate, save


def run(ctx) -> dict:
    """Inputs: ``model``; data: ``config.data.name``. Writes ``stats.safetensors`` and ``summary.json``."""
    cfg = ctx.stage["config"]
    data = cfg.get("data") or {}
    torch.manual_seed(int(cfg.get("seed") or 0))  # scores are deterministic; this pins any stray RNG
    stats, summary = calibrate(
        ctx.inputs["model"], source=ctx.data.get(data.get("name")), samples=int(cfg["samples"]),
        seq_len=int(cfg["seq_len"]), batch_size=int(cfg.get("batch_size") or 4),
        offset=int(data.get("offset") or 0), scores=cfg["scores"], angular_block=cfg.get("angular_block"),
    )
    save(stats, summary, ctx.out)
    ctx.log(f"calibrate: {summary['tokens']:,} tokens, scores {', '.join(cfg['scores'])}")
    skipped = {"data_skipped": summary["data_skipped"]} if "data_skipped" in summary else {}
    return {"tokens": summary["tokens"], **skipped}  # records skipped under on_error: skip, in the manifest
