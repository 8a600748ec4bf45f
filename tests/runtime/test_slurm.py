"""A real Slurm (tests/slurmkit.py: munged, slurmctld and two slurmd nodes on this host) runs what
`cascadec plan --emit` writes for a small family: two independent chains (bootstrap -> calibrate ->
prune -> distill -> export, for children a and b).

- `submit.sh` submits every stage as a job; every job succeeds, the two chains overlap in time,
  and the weights equal those of one local `cascadec run` of the same plan, bit for bit.
- A stage planned with `nodes: 2` runs as one executor that `srun`s `accelerate launch` on both
  Slurm nodes (machine ranks 0 and 1 from SLURM_NODEID, rendezvous at the first node's address),
  and equals the 1-process run.
- A job cancelled mid-stage (scancel) resumes from its step checkpoint when resubmitted; a job
  sent SIGUSR1 (as Slurm does before the time limit) checkpoints, requeues itself and resumes;
  both end equal to the uninterrupted run.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # `cascadec` of this environment, for the jobs' PATH
SPEC = """
cascadec: 1
family: duo
budget: {tokens: 40K}
hardware:
  device: cpu
  peak_tflops: {assumed: 0.2, why: "2 CPU cores"}
  mfu: {assumed: 0.05, why: "tiny matrices"}
defaults:
  resources: {devices: 1, launcher: local, precision: fp32}
  optimizer: {lr: 2.0e-3, min_lr: 2.0e-4, weight_decay: 0.0, grad_clip: 1.0}
  schedule: {kind: cosine, warmup_steps: 2}
  batch: {global: 4, micro: 2}
  checkpoint: {every_steps: 5, keep: 2}
  loss: {kind: forward_kl, temperature: 1.0, chunk_tokens: 256}
  calibration: {data: train, samples: 8, seq_len: 32, batch_size: 8}
models:
  parent:
    source: {bootstrap: {data: stream, tokens: 50%, seq_len: 32, vocab_size: 512}}
    arch: {family: mistral, layers: 2, hidden: 32, ffn: 64, heads: 2, kv_heads: 1, head_dim: 16, vocab: 512}
data:
  train: {kind: builtin, builtin: stdlib, split: train}
  stream: {kind: builtin, builtin: stdlib, split: train, stream: true}
children:
  - name: a
    prune_from: parent
    shape: {ffn: 48}
    pruning: {ffn: activation}
    phases: [{name: short, teacher: parent, data: stream, tokens: 40K, seq_len: 32}]
  - name: b
    prune_from: parent
    shape: {ffn: 32}
    pruning: {ffn: activation}
    phases: [{name: short, teacher: parent, data: stream, tokens: 25%, seq_len: 32}]
"""
LONG = "distill/a/short"  # 312 steps: long enough to be interrupted


def _plan(root: Path, spec: dict) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "duo.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([BIN / "cascadec", "plan", "duo.yaml", "-o", "plan.json", "--emit", "launch"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((root / "plan.json").read_text())


def _weights(workdir: Path) -> dict[str, dict]:
    return {str(p.relative_to(workdir)): load_file(str(p)) for p in sorted((workdir / "stages").rglob("*.safetensors"))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _manifest(workdir: Path, sid: str) -> dict:
    return json.loads((workdir / "stages" / sid / "manifest.json").read_text())


def _interval(workdir: Path, sid: str) -> tuple[datetime.datetime, datetime.datetime]:
    m = _manifest(workdir, sid)
    return datetime.datetime.fromisoformat(m["started_at"]), datetime.datetime.fromisoformat(m["finished_at"])


def _env() -> dict:
    return {"PATH": f"{BIN}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The plan, and a workspace where one local `cascadec run` ran all of it (the reference)."""
    root = tmp_path_factory.mktemp("duo")
    plan = _plan(root, yaml.safe_load(SPEC))
    done = subprocess.run([BIN / "cascadec", "run", "plan.json", "--workdir", "ref"], cwd=root, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, plan


def _submit(slurm, emit: Path, sbatch: str, workdir: Path) -> str:
    return slurm.run("sbatch", "--parsable", f"slurm/{sbatch}", cwd=emit,
                     env={**_env(), "WORKDIR": str(workdir)}).stdout.strip().split(";")[0]


def _log(emit: Path, jobs) -> str:
    return "\n".join((emit / f"slurm-{j}.out").read_text() for j in jobs if (emit / f"slurm-{j}.out").exists())


def test_submit_sh_runs_every_stage_as_a_job_in_parallel_and_equals_the_local_run(slurm, family):
    root, plan = family
    done = slurm.run("bash", "launch/submit.sh", cwd=root, env={**_env(), "WORKDIR": str(root / "slurm")})
    jobs = {line.split()[1]: line.split()[-1] for line in done.stdout.splitlines() if line.startswith("submitted")}
    assert list(jobs) == [s["id"] for s in plan["stages"]]
    final = slurm.wait(jobs.values())
    log = _log(root / "launch", jobs.values())
    assert {sid: j["JobState"] for sid, j in zip(jobs, final.values())} == {sid: "COMPLETED" for sid in jobs}, log
    assert all(j["ExitCode"] == "0:0" for j in final.values())
    # independent stages ran at once: each stage of chain a overlaps its twin of chain b somewhere
    overlaps = []
    for kind in ("calibrate", "prune", "distill/{}/short", "export"):
        (a0, a1), (b0, b1) = (_interval(root / "slurm", kind.format(c) if "{" in kind else f"{kind}/{c}") for c in "ab")
        overlaps.append(a0 < b1 and b0 < a1)
    assert any(overlaps), overlaps
    assert {_manifest(root / "slurm", s["id"])["slurm_job_id"] for s in plan["stages"]} == set(jobs.values())
    assert _same_all(_weights(root / "slurm"), _weights(root / "ref"))


def _same_all(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def _same_as_reference(ws: Path, ref: Path, sid: str) -> bool:
    """Every checkpoint in ``ws`` (which holds ``sid``'s) equals the reference's, bit for bit."""
    mine, theirs = _weights(ws), _weights(ref)
    assert any(k.startswith(f"stages/{sid}/") for k in mine)
    return all(k in theirs and _same(v, theirs[k]) for k, v in mine.items())


def test_a_two_node_stage_runs_one_launcher_per_node_and_equals_one_process(slurm, family, tmp_path):
    root, plan = family
    spec = yaml.safe_load(SPEC)
    spec["children"][1]["phases"][0]["resources"] = {"devices": 2, "nodes": 2, "launcher": "slurm", "strategy": "ddp"}
    two = _plan(tmp_path / "two", spec)
    _workspace_without(root, tmp_path / "ws", "distill/b/short", "export/b")  # its ancestors are up to date
    job = _submit(slurm, tmp_path / "two" / "launch", "distill--b--short.sbatch", tmp_path / "ws")
    info = slurm.wait([job])[job]
    log = _log(tmp_path / "two" / "launch", [job])
    assert (info["JobState"], info["NodeList"], info["NumNodes"]) == ("COMPLETED", "n[1-2]", "2"), log
    assert re.search(r"^run +distill/b/short +\(new\)$", log, re.M) and re.search(r"^skip +prune/b ", log, re.M)
    m = _manifest(tmp_path / "ws", "distill/b/short")
    assert m["metrics"]["processes"] == 2 and m["launch"]["nodes"] == 2
    assert m["hash"] == next(s["hash"] for s in two["stages"] if s["id"] == "distill/b/short")
    # same global batch: the one difference from one process is the gradient all-reduce's summation order
    a = load_file(str(tmp_path / "ws/stages/distill/b/short/model/model.safetensors"))
    b = load_file(str(root / "ref/stages/distill/b/short/model/model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def _workspace_without(root: Path, dest: Path, *stages: str) -> Path:
    shutil.copytree(root / "ref", dest, ignore=shutil.ignore_patterns("locks"))
    for sid in stages:
        shutil.rmtree(dest / "stages" / sid)
    return dest


def _start_long_stage(slurm, root: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """Submit LONG's job into a copy of the reference workspace without it; return (workspace,
    emit dir, job id) once the job has written its first step checkpoint."""
    ws = _workspace_without(root, tmp_path / "ws", LONG, "export/a")
    job = _submit(slurm, root / "launch", "distill--a--short.sbatch", ws)
    checkpoints = ws / "scratch" / LONG / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step-*")):
        assert time.monotonic() < deadline, "no step checkpoint appeared"
        time.sleep(0.05)
    return ws, root / "launch", job


def test_a_cancelled_job_resumes_when_resubmitted_and_equals_an_uninterrupted_run(slurm, family, tmp_path):
    root, _ = family
    ws, emit, first = _start_long_stage(slurm, root, tmp_path)
    slurm.run("scancel", first)
    assert slurm.wait([first])[first]["JobState"] == "CANCELLED"
    assert not (ws / "stages" / LONG / "manifest.json").exists()
    second = _submit(slurm, emit, "distill--a--short.sbatch", ws)
    assert slurm.wait([second])[second]["JobState"] == "COMPLETED", _log(emit, [first, second])
    log = _log(emit, [second])
    assert re.search(rf"^run +{LONG} +\(interrupted: resumes from scratch/{LONG}\)$", log, re.M), log
    resumed = _manifest(ws, LONG)["metrics"]["resumed_from_step"]
    assert 0 < resumed < 312
    assert _same_as_reference(ws, root / "ref", LONG)


def test_sigusr1_before_the_time_limit_checkpoints_requeues_and_resumes(slurm, family, tmp_path):
    root, _ = family
    ws, emit, job = _start_long_stage(slurm, root, tmp_path)
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what `#SBATCH --signal=B:USR1@600` does
    info = slurm.wait([job])[job]
    log = _log(emit, [job])
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log
    assert f"requeued Slurm job {job}, which resumes there" in log
    stopped = int(log.split("after its step checkpoint of step ")[1].split(";")[0])
    assert _manifest(ws, LONG)["metrics"]["resumed_from_step"] == stopped > 0
    assert _same_as_reference(ws, root / "ref", LONG)
