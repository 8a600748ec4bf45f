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


# Kinds that run in one process only. grpo: refilling dropped groups makes the processes' batches
# unequal (runtime/stages/grpo.py); a plan that gives it more devices (the Ministral 3 spec's fsdp
# stages) is refused before its first stage runs, not days into the plan.
ONE_PROCESS = {"grpo"}


def unrunnable(stage: dict) -> str | None:
    """Why ``stage`` cannot run in this runtime (its kind, or its kind on its launch)."""
    kind = stage.get("kind")
    if why := missing(kind):
        return why
    devices = int((stage.get("launch") or {}).get("devices") or 1)
    if kind in ONE_PROCESS and devices != 1:
        return (f"{kind} runs in one process in this runtime, not {devices} (stage {stage.get('id')}); "
                "set `resources.devices: 1` on the step")
    return None


def missing(kind: str) -> str | None:
    """Why ``kind`` cannot run in this runtime, or None when it can."""
    fn = STAGES.get(kind)
    module = getattr(fn, "module", None)
    try:
        absent = fn is None or (module is not None and importlib.util.find_spec(module) is None)
    except ModuleNotFoundError:  # no stages package at all
        absent = True
    return f"stage kind {kind!r} is not implemented in this runtime" if absent else None
