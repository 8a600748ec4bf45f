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
    for s in stages:
        hours = max(1, math.ceil(s["estimate"]["device_hours"] / max(1, s["launch"]["devices"]) * 1.5))
        files[f"slurm/{s['file']}"] = sbatch.render(s=s, hours=hours, **common)
    return files


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
