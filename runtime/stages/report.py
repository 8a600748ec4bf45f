"""`report` stage: the family report as the last stage of a run (see runtime/report.py).

Its inputs are every eval stage's eval.json; it also reads the plan and the other stages'
manifests and metrics from the workspace, which the executor hands it as ``ctx.plan`` and
``ctx.workdir``.
"""

from __future__ import annotations

from ..context import StageContext
from ..report import write


def run(ctx: StageContext) -> dict:
    data = write(ctx.plan, ctx.workdir, ctx.out)
    for c in data["children"]:
        ctx.log(f"report {c['child']}: held-out {c['loss']}, parent {c['parent_loss']}, "
                f"pruned {c['pruned_loss']}, control {c['control_loss']}")
    return {"children": len(data["children"])}
