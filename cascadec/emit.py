"""`cascadec plan --emit DIR`: launch scripts (shell and Slurm) rendered from the plan with jinja2.

Templates render in jinja2's SandboxedEnvironment with StrictUndefined; every value that
reaches a shell line goes through `shquote`. Writes into a temporary directory first and
renames it into place, so a failed render leaves no half-written DIR.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import tempfile
from importlib import resources

from . import __version__

# The Slurm time limit of a stage's job: its estimated wall time (device-hours / devices) x MARGIN,
# at least MIN_HOURS, at most `resources.max_hours` (DEFAULT_MAX_HOURS). A stage that needs more
# runs as several jobs: SIGNAL_LEAD_S before the limit Slurm sends SIGUSR1 to the batch shell
# (`exec`'d into `cascadec run`), the stage writes a step checkpoint, and the job requeues itself
# (`#SBATCH --requeue`) and resumes there. Estimates assume an MFU; the margin covers a worse one.
MARGIN = 1.5
MIN_HOURS = 1
DEFAULT_MAX_HOURS = 24
SIGNAL_LEAD_S = 600


def render(plan: dict, plan_path: str, workdir: str) -> dict[str, str]:
    """File name (relative to DIR) -> contents."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                               lstrip_blocks=True, autoescape=False)
    env.filters["shquote"] = lambda v: shlex.quote(str(v))
    templates = resources.files("cascadec").joinpath("templates")

    def tpl(name):
        return env.from_string(templates.joinpath(name).read_text())

    stages = [dict(s, file=s["id"].replace("/", "--") + ".sbatch") for s in plan["stages"]]
    common = dict(version=__version__, family=plan["family"], spec_sha=plan["spec_sha256"][:12],
                  plan_path=plan_path, workdir=workdir)
    files = {"run.sh": tpl("run.sh.j2").render(stages=stages, **common),
             "submit.sh": tpl("submit.sh.j2").render(stages=stages, **common)}
    sbatch = tpl("stage.sbatch.j2")
    gpus = (plan.get("totals") or {}).get("hardware", {}).get("device") != "cpu"
    for s in stages:
        options = {k: v for k, v in s.get("slurm", {}).items() if k != "max_hours"}
        many = s["launch"]["nodes"] > 1 or s["launch"]["launcher"] == "slurm"
        how = ("with srun, one `accelerate launch` per node (machine rank: SLURM_NODEID; head: the job's first node)"
               if many else "on this node")
        files[f"slurm/{s['file']}"] = sbatch.render(s=s, time=time_limit(s), gpus=gpus, options=options, how=how,
                                                    signal_lead=SIGNAL_LEAD_S, **common)
    return files


def time_limit(stage: dict) -> str:
    """`#SBATCH --time` (D-HH:MM:SS) for a stage: see MARGIN above."""
    wall = stage["estimate"]["device_hours"] / max(1, stage["launch"]["devices"])
    cap = stage.get("slurm", {}).get("max_hours", DEFAULT_MAX_HOURS)
    hours = min(cap, max(MIN_HOURS, math.ceil(wall * MARGIN)))
    return f"{hours // 24}-{hours % 24:02d}:00:00"


def write(directory: str, files: dict[str, str]) -> None:
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".cascadec-emit-", dir=parent)
    try:
        for name, text in files.items():
            path = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            if name.endswith(".sh") or name.endswith(".sbatch"):
                os.chmod(path, 0o755)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
