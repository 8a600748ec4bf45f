"""Process entry point for a stage under `accelerate launch`: rebuild the context, run the stage.

    accelerate launch --num_processes 2 -m cascadec.runtime.stage_main --ctx-json CTX.json

CTX.json holds the `StageContext` fields (``stage``, ``inputs``, ``data``, ``out``, ``scratch``,
``cache``) and ``result``, the file the main process writes the stage's metrics to (or
``{"preempted_at_step": N}`` when it stopped on request, see preempt.py). Every process runs the
same stage function; Accelerate tells each one its rank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import preempt
from .context import StageContext

PREEMPTED = "preempted_at_step"  # the result's one key when the stage stopped on request


def load_context(path: Path) -> tuple[StageContext, Path | None]:
    raw = json.loads(Path(path).read_text())
    ctx = StageContext(
        stage=raw["stage"],
        inputs={role: Path(p) for role, p in raw.get("inputs", {}).items()},
        data=raw.get("data", {}),
        out=Path(raw["out"]),
        scratch=Path(raw["scratch"]),
        cache=Path(raw["cache"]) if raw.get("cache") else None,
        workdir=Path(raw["workdir"]) if raw.get("workdir") else None,
    )
    return ctx, Path(raw["result"]) if raw.get("result") else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cascadec.runtime.stage_main", description=__doc__.splitlines()[0])
    parser.add_argument("--ctx-json", required=True, type=Path, help="the stage context as JSON (see module doc)")
    args = parser.parse_args(argv)
    ctx, result = load_context(args.ctx_json)

    from accelerate import PartialState

    from .registry import STAGES
    from .training.train import on_cpu

    state = PartialState(cpu=on_cpu())
    if not state.is_main_process:
        ctx.log = lambda msg: None
    preempt.install()
    try:
        metrics = STAGES[ctx.stage["kind"]](ctx)
    except preempt.Preempted as e:  # every rank stops at the same step; the executor requeues
        metrics = {PREEMPTED: e.step}
    if state.is_main_process and result is not None:
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, default=float, indent=2))
        tmp.rename(result)


if __name__ == "__main__":
    main()
