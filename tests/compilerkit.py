"""Helpers for the compiler tests: run the CLI (in-process or as a real subprocess), compare goldens.

In-process runs are fast and show a crash as the failing test's traceback; subprocess runs are
the real thing (entry point, exit status, stderr) and are used where that matters.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cascadec import cli
from cascadec.plan import canonical

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").rglob("*.yaml"))  # the examples and the cookbook (specs/cookbook/)


def spec_id(spec: Path) -> str:
    """`specs/cookbook/qwen3.yaml` -> `cookbook/qwen3`: test ids and golden names (`tests/golden/<id>.plan.json`)."""
    return spec.relative_to(REPO / "specs").with_suffix("").as_posix()
GOLDEN = REPO / "tests" / "golden"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def cascadec(*args: str, cwd: Path = REPO) -> Run:
    """`cascadec ARGS` in-process, from ``cwd``; exceptions propagate (a traceback fails the test)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return Run(code, out.getvalue(), err.getvalue())


def cascadec_subprocess(*args: str, cwd: Path = REPO, env: dict | None = None) -> Run:
    """`cascadec ARGS` as a real process (python -m cascadec), so the exit status and stderr are exact."""
    p = subprocess.run([sys.executable, "-m", "cascadec", *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=120)
    return Run(p.returncode, p.stdout, p.stderr)


def check_golden(path: Path, actual: str, update: bool) -> None:
    """Equal to the golden file byte for byte, or rewrite it under --update-goldens."""
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8", newline="")
        return
    if not path.exists():
        pytest.fail(f"{path.relative_to(REPO)} does not exist; create it with `pytest --update-goldens`")
    with open(path, encoding="utf-8", newline="") as f:
        expected = f.read()
    assert actual == expected, f"{path.relative_to(REPO)} differs; if the change is intended, run `pytest --update-goldens`"


def plan_json(spec: Path, spec_file: str) -> str:
    """The canonical plan of ``spec`` as `cascadec plan --format json` prints it, with ``spec_file`` set."""
    run = cascadec("plan", str(spec.relative_to(REPO)), "--format", "json")
    assert run.code == 0, run.err
    plan = json.loads(run.out)
    plan["spec_file"] = spec_file
    return canonical(plan)
