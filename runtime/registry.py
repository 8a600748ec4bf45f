"""Stage kind -> the function that runs it. Owns this table only; the executor calls it.

Each entry imports its module on first call: stage modules import torch, and `cascadec run
--dry-run`, or a plan that only needs a few kinds, must not pay for (or break on) all of them.
A kind whose module does not exist yet is reported by `missing`, before any stage runs.
"""

from __future__ import annotations

import importlib
import importlib.util

PACKAGE = f"{__package__}.stages"


def _lazy(module: str):
    """`run(ctx)` of `runtime/stages/<module>.py`, imported when first called."""

    def run(ctx):
        return importlib.import_module(f"{PACKAGE}.{module}").run(ctx)

    run.module = f"{PACKAGE}.{module}"
    return run


STAGES = {
    "tokenize": _lazy("tokenize"),
    "bootstrap": _lazy("bootstrap"),
    "calibrate": _lazy("calibrate"),
    "prune": _lazy("prune"),
    "teacher-logits": _lazy("teacher_logits"),
    "distill": _lazy("distill"),
    "control": _lazy("control"),
    "sft": _lazy("sft"),
    "dpo": _lazy("dpo"),
    "odpo": _lazy("odpo"),
    "grpo": _lazy("grpo"),
    "eval": _lazy("eval"),
    "export": _lazy("export"),
    "report": _lazy("report"),
}


def missing(kind: str) -> str | None:
    """Why ``kind`` cannot run in this runtime, or None when it can."""
    fn = STAGES.get(kind)
    module = getattr(fn, "module", None)
    try:
        absent = fn is None or (module is not None and importlib.util.find_spec(module) is None)
    except ModuleNotFoundError:  # no stages package at all
        absent = True
    return f"stage kind {kind!r} is not implemented in this runtime" if absent else None
