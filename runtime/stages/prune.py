"""The `prune` stage: cut the input model to ``config.target`` -> ``model/`` (a Hugging Face dir).

A thin reader of the plan's config; the choices are runtime/surgery/keep.py's, the rewrite runtime/surgery/prune.py's.
"""

from __future__ import annotations

from cascadec.shapes import from_hf_config

from ..surgery.adapters import read_config
from ..surgery.calibrate import load
from ..surgery.prune import plan_target, prune


def run(ctx) -> dict:
    """Inputs: ``model`` and ``stats`` (a calibrate stage's output). Writes ``model/``."""
    source = from_hf_config(read_config(ctx.inputs["model"]))
    target, methods = plan_target(ctx.stage["config"], source)
    stats = load(ctx.inputs["stats"]) if any(methods.values()) else {}
    report = prune(ctx.inputs["model"], ctx.out / "model", stats=stats, target=target, methods=methods, log=ctx.log)
    return {"params": report["params"], "source_params": report["source_params"],
            "layers_kept": len(report["kept"]["layers"]["kept"]), "reconstruction": report["reconstruction"]}
