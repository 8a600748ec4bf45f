"""Runs a plan: walks its stages in order, runs those that are not up to date, and stores each
one's outputs atomically with its manifest. Never parses specs.

Each stage runs under its own lock (`cascadec.workspace.stage_lock`, host + pid), so runs of
other stages, e.g. Slurm jobs on other nodes, may share the workspace. A stage planned for
several nodes or for Slurm runs inside a Slurm job: this executor decides whether it is up to
date, `srun`s one `accelerate launch` per node, and stores what rank 0 wrote. SIGUSR1 (sent by
Slurm before the time limit) makes a training stage write a step checkpoint and stop; the job
is then requeued and resumes there (runtime/preempt.py).

Whether a stage is up to date is decided by `cascadec.workspace` (pure, shared with `status`).

Storing a stage (old outputs stay intact until the new ones are complete):

    stages/.tmp-<id>@<host>-<pid>/   the stage writes here; then outputs hashed, manifest.json written
    stages/<id>/  -> stages/.old-<id>@<host>-<pid>/   (only when an earlier version exists)
    stages/.tmp-<id>@<host>-<pid>/ -> stages/<id>/    (if this rename fails, the old one is put back)
    stages/.old-<id>@<host>-<pid>/   removed;  scratch/<id>/ removed
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from cascadec import __version__, hub
from cascadec.diagnostics import did_you_mean
from cascadec.hub import Revisions
from cascadec.workspace import (
    BUSY,
    MANIFEST,
    RUN,
    RUNNING,
    SCRATCH_MARK,
    Digests,
    SKIP,
    Verdict,
    WorkspaceError,
    atomic_write_json,
    data_names,
    evaluate,
    format_row,
    hash_outputs,
    input_hashes,
    leftovers,
    missing_outputs,
    running,
    scratch_dir,
    scratch_hash,
    stage_dir,
    resolve_source,
    stage_lock,
    summary,
    temp_dir,
    validate_plan,
)

from . import preempt, registry
from .context import StageContext
from .progress import quiet_libraries
from .stage_main import PREEMPTED

STAGE_MAIN = "cascadec.runtime.stage_main"  # `python -m ... --ctx-json FILE`, one per process
WAIT = "wait"  # the row state of a stage whose input another process is still making


def run_plan(
    plan: dict,
    workdir: Path,
    base_dir: Path,
    *,
    only: list[str] = (),
    force: list[str] = (),
    dry_run: bool = False,
    out=print,
) -> int:
    """Run the stages of ``plan`` that are not up to date; return the exit status.

    ``only``: fnmatch globs over stage ids; runs the matching stages *and* those of their
    ancestors that are out of date (as `dvc repro TARGET`), never their descendants.
    ``force``: globs of stages to rerun even when up to date; their ancestors run only if out
    of date, and a stage downstream reruns only if the forced one's outputs came out different.
    ``base_dir``: what the plan's local paths (model sources, data globs) are relative to.
    ``dry_run``: print what would run; exit 0 when nothing would, 2 when work is pending
    (Terraform's -detailed-exitcode), also when some stage's kind is missing from this runtime
    (that is a `warning:` line after the summary: the plan is still what it is). Otherwise 0 on success and 1 on any error, which is
    printed as one `error: ...` line; the stages after a failed one are not run. A stage that
    another process is running (its lock is held) is `busy`, the stages that need it `wait`, the
    others run, and the exit status is 1. A stage stopped by SIGUSR1 ends the run: inside a Slurm
    job the job is requeued (0), elsewhere 1.
    """
    workdir, base_dir = Path(workdir), Path(base_dir).resolve()
    quiet_libraries()  # outside a terminal: plain progress lines, no bar refreshes (progress.py)
    try:
        stages = select(plan, only, force)
        forced = {s["id"] for s in stages if _matches(s["id"], force)}
        unrunnable = [f"{why} (stage {st['id']})" for st in stages if (why := registry.missing(st["kind"]))]
        refusal = unrunnable and f"{unrunnable[0]}; --only can select the stages that do not need it"
        if refusal and not dry_run:  # refuse before anything runs, not hours into the plan
            raise WorkspaceError(refusal)
        width = max((len(s["id"]) for s in stages), default=0)
        ran, pending, busy, waiting = 0, set(), {}, []
        digests, revisions = Digests(workdir), Revisions(plan, local_only=False)
        check = dict(plan=plan, base_dir=base_dir, digests=digests, revisions=revisions)
        current: list[Path] = []  # the scratch of the stage running now, for the SIGUSR1 handler
        if not dry_run:
            preempt.install(then=lambda: [(p / preempt.STOP_FILE).touch() for p in current if p.is_dir()])
        for st in stages:
            sid = st["id"]
            if needs := [n for n in st.get("needs", []) if n in busy and not dry_run]:
                busy[sid] = busy[needs[0]]  # its input is still being made elsewhere
                waiting.append(sid)
                out(format_row({"stage": sid, "state": WAIT, "why": f"needs {needs[0]}"}, width))
                continue
            v = evaluate(st, workdir, pending=pending, forced=sid in forced, **check)
            if v.state == RUN and not dry_run:  # look again holding its lock: another job may have run it
                with stage_lock(workdir, sid) as held:
                    v = (evaluate(st, workdir, forced=sid in forced, locked=True, **check) if held
                         else Verdict(BUSY, RUNNING, running(workdir, sid) or "another host (pid unknown)"))
                    out(format_row({"stage": sid, "state": v.state, "why": v.why, "detail": v.detail}, width))
                    if v.state == RUN:
                        current[:] = [scratch_dir(workdir, sid)]
                        run_stage(plan, st, workdir, base_dir, out, digests, revisions)
                        current.clear()
            else:
                out(format_row({"stage": sid, "state": v.state, "why": v.why, "detail": v.detail}, width))
            ran += v.state == RUN
            if v.state == BUSY:
                busy[sid] = v.detail
            if v.state != SKIP and dry_run:
                pending.add(sid)  # a real run has run it by now: what it made is on disk
            elif v.state == SKIP and v.fresh_stats and not dry_run:
                _store_stats(workdir, sid, v.manifest, v.fresh_stats)
        out(summary(ran, len(stages) - ran - len(busy), done=not dry_run, busy=len(busy) - len(waiting),
                    waiting=len(waiting)))
        if refusal:  # a dry run still answers its question (0/2); it says what a real run would refuse
            out(f"warning: a run would refuse to start: {refusal}")
        if busy and not dry_run:
            raise WorkspaceError(_unfinished(busy, waiting))
        return 2 if dry_run and (ran or busy) else 0
    except preempt.Preempted as e:
        return _requeue(e, out)
    except WorkspaceError as e:
        out(f"error: {e}")
        return 1


def _unfinished(busy: dict, waiting: list) -> str:
    others = [f"{sid} on {who}" for sid, who in busy.items() if sid not in waiting]
    message = f"running elsewhere: {', '.join(others)}"
    if waiting:
        message += f"; not run, as {'it needs' if len(waiting) == 1 else 'they need'} what is running: {', '.join(waiting)}"
    return message + "; run again once it has finished"


def _requeue(e: preempt.Preempted, out) -> int:
    """After a stop on SIGUSR1: inside a Slurm job, requeue it (it resumes from the checkpoint)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        out(f"error: {e}; run again to resume")
        return 1
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        out(f"error: {e}; `scontrol requeue {job}` failed ({done.stderr.strip()}); resubmit the job to resume")
        return 1
    out(f"      {e}; requeued Slurm job {job}, which resumes there")
    return 0


def _matches(stage_id: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(stage_id, g) for g in globs)


def select(plan: dict, only, force) -> list[dict]:
    """The stages a run considers, in plan order: all, or the --only matches and their ancestors."""
    stages = validate_plan(plan)
    wanted = {s["id"] for s in stages if not only or _matches(s["id"], only)}
    for st in reversed(stages):
        if st["id"] in wanted:
            wanted.update(st.get("needs", []))
    chosen = [s for s in stages if s["id"] in wanted]
    for flag, globs, pool in (("--only", only, stages), ("--force", force, chosen)):
        for g in globs:
            if not any(_matches(s["id"], [g]) for s in pool):
                hint = did_you_mean(g, [s["id"] for s in pool])
                scope = "no stage selected by --only" if only and pool is chosen else "no stage"
                raise WorkspaceError(f"{flag} {g!r} matches {scope}" + (f"; {hint}" if hint else ""))
    return chosen


def run_stage(plan: dict, stage: dict, workdir: Path, base_dir: Path, out=print, digests: Digests | None = None,
              revisions: Revisions | None = None) -> None:
    """Run one stage into a temporary directory and store its outputs and manifest.

    Raises WorkspaceError naming the stage when it fails; the previous outputs are untouched,
    the temporary directory is removed and scratch/<id>/ is kept so that a rerun resumes.
    """
    sid = stage["id"]
    revisions = revisions or Revisions(plan, local_only=False)
    inputs, data = resolve_inputs(plan, stage, workdir, base_dir, revisions)
    commits = revisions.record(stage)  # the commits resolve_inputs downloaded (resolved once per run)
    for name, rev in commits.items():
        out(f"      model {name!r}: {rev['hub']}@{rev['revision']} = {rev['commit']}")
    # The data files' digests are taken before the stage reads them: a file edited while the
    # stage runs leaves it out of date, never recorded as read.
    digests = digests or Digests(workdir)
    files = {name: digests.files(plan, name, base_dir) for name in data_names(stage)}
    for old in leftovers(workdir, sid):
        shutil.rmtree(old, ignore_errors=True)
    scratch = scratch_dir(workdir, sid)
    if scratch_hash(workdir, sid) != stage["hash"]:  # checkpoints of another config: start over
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / SCRATCH_MARK).write_text(stage["hash"] + "\n")
    if not preempt.signalled():  # a STOP file that an earlier job left behind
        (scratch / preempt.STOP_FILE).unlink(missing_ok=True)
    tmp = temp_dir(workdir, sid)
    tmp.mkdir(parents=True)
    ctx = StageContext(
        stage=stage, inputs=inputs, data=data, out=tmp, scratch=scratch,
        log=lambda msg: out(f"      {msg}"), cache=Path(workdir) / "cache",
        plan=plan, workdir=Path(workdir),
    )
    started, started_at = time.monotonic(), _now()
    try:
        try:
            metrics = _spawn(ctx) if needs_launcher(stage) else registry.STAGES[stage["kind"]](ctx)
            metrics = _checked_metrics(metrics)
            if lost := missing_outputs(tmp, stage):
                raise WorkspaceError(f"it did not write its declared output {', '.join(lost)}")
        except preempt.Preempted:
            raise  # scratch/<id>/ keeps the step checkpoint it just wrote
        except Exception as e:
            with contextlib.suppress(OSError):
                (scratch / "traceback.txt").write_text(traceback.format_exc())
            why = str(e) or type(e).__name__
            raise WorkspaceError(f"stage {sid} failed: {why} (traceback in scratch/{sid}/traceback.txt)") from e
        try:
            _store(workdir, sid, tmp, _manifest(stage, workdir, tmp, metrics, time.monotonic() - started, files,
                                                started_at, commits))
        except OSError as e:
            raise WorkspaceError(
                f"could not store the outputs of stage {sid}: {e}; its previous outputs are unchanged"
            ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    for parent in scratch.relative_to(workdir / "scratch").parents[:-1]:  # scratch/distill/x ...
        with contextlib.suppress(OSError):
            (workdir / "scratch" / parent).rmdir()  # only if empty
    out(f"      done in {time.monotonic() - started:.1f}s")


def resolve_inputs(plan: dict, stage: dict, workdir: Path, base_dir: Path,
                   revisions: Revisions | None = None) -> tuple[dict, dict]:
    """({role: local path}, {data name: source with `paths` expanded}) for a stage.

    Stage inputs are workspace paths; a model's local `source.path` and data globs are
    relative to ``base_dir`` (the spec's directory); globs are expanded and sorted. A hub model
    becomes its snapshot folder at the commit ``revisions`` resolves (downloaded when not
    cached): the one place the runtime turns a hub id into files, so no stage ever sees an id.
    """
    sid, inputs, data = stage["id"], {}, {}
    for inp in stage.get("inputs", []):
        role = inp.get("role")
        if "stage" in inp:
            path = Path(workdir) / inp["path"]
            if not path.exists():
                raise WorkspaceError(f"stage {sid}: input {role!r} ({inp['path']}) is missing; rerun {inp['stage']}")
            inputs[role] = path
        elif "model" in inp:
            source = plan.get("models", {}).get(inp["model"], {}).get("source")
            if isinstance(source, dict) and "hub" in source:
                m = hub.hub_model(plan, inp["model"])
                try:
                    inputs[role] = hub.snapshot(m, (revisions or Revisions(plan, local_only=False)).commit(m))
                except hub.HubError as e:
                    raise WorkspaceError(f"stage {sid}: {e}") from None
            elif isinstance(source, dict) and "path" in source:
                inputs[role] = base_dir / source["path"]
                if not inputs[role].exists():
                    raise WorkspaceError(f"stage {sid}: model {inp['model']!r} not found at {inputs[role]}")
            else:
                raise WorkspaceError(f"stage {sid}: model {inp['model']!r} has no source path or hub id in the plan")
        elif "data" in inp:
            source = plan.get("data", {}).get(inp["data"])
            if not isinstance(source, dict):
                raise WorkspaceError(f"stage {sid}: data {inp['data']!r} is not in the plan")
            data[inp["data"]] = resolved = {**resolve_source(source, base_dir), "name": inp["data"]}  # the name locates errors
            if source.get("paths") and not resolved["paths"]:
                raise WorkspaceError(f"stage {sid}: data {inp['data']!r}: no file matches {', '.join(source['paths'])} in {base_dir}")
        else:
            raise WorkspaceError(f"stage {sid}: input {role!r} names no stage, model or data")
    return inputs, data


def needs_launcher(stage: dict) -> bool:
    launch = stage.get("launch") or {}
    return launch.get("devices", 1) > 1 or launch.get("launcher") in ("accelerate", "slurm") or launch.get("nodes", 1) > 1


def on_slurm(stage: dict) -> bool:
    """Whether the stage runs as a Slurm job step (`srun`, one launcher per node)."""
    launch = stage.get("launch") or {}
    return launch.get("launcher") == "slurm" or launch.get("nodes", 1) > 1


def launch_command(stage: dict, ctx_json: Path, env=os.environ) -> list[str]:
    """The command that runs the stage's processes.

    One node: `python -m accelerate.commands.launch ... -m cascadec.runtime.stage_main --ctx-json
    FILE` (run as a module so it is this interpreter's accelerate). Slurm or several nodes: the
    same under `srun`, one task per node, each task's machine rank its SLURM_NODEID, the head the
    first node of the job, the rendezvous port derived from the job id. Only inside a Slurm job.
    """
    launch = stage.get("launch") or {}
    n, nodes = launch.get("devices", 1), launch.get("nodes", 1)
    if on_slurm(stage) and not env.get("SLURM_JOB_ID"):
        raise WorkspaceError(
            f"stage {stage['id']} is planned for Slurm{f' on {nodes} nodes' if nodes > 1 else ''}; submit its job "
            "(slurm/*.sbatch from `cascadec plan --emit DIR`), which runs this same command inside the allocation"
        )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", str(nodes)]
    if nodes > 1:
        port = 20000 + int(env["SLURM_JOB_ID"]) % 10000  # two jobs on one head node get two ports
        cmd += ["--main_process_ip", head_node(env["SLURM_JOB_NODELIST"]), "--main_process_port", str(port)]
    cmd += ["--dynamo_backend", "no"]  # stated, so accelerate does not warn about defaults
    # the plan keeps precision in the stage's config (the stage reads it too)
    precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}.get((stage.get("config") or {}).get("precision"))
    if precision:
        cmd += ["--mixed_precision", precision]
    # fsdp: the stage applies FSDP2 itself (training/fsdp.py); Accelerate only starts the processes
    # and their process group, as for ddp (docs/runtime.md, Distributed training)
    if n > 1 and launch.get("strategy") in (None, "none", "ddp", "fsdp"):
        cmd += ["--multi_gpu"]
    cmd += ["-m", STAGE_MAIN, "--ctx-json", str(ctx_json)]
    if not on_slurm(stage):
        return cmd
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if nodes > 1:  # each task's shell inserts its own machine rank before `-m stage_main`
        k = cmd.index(STAGE_MAIN) - 1
        insert = f'exec "${{@:1:{k}}}" --machine_rank "$SLURM_NODEID" "${{@:{k + 1}}}"'
        return [*srun, "bash", "-c", insert, "launch", *cmd]
    return [*srun, *cmd]


def head_node(nodelist: str) -> str:
    """The address of the job's first node (`scontrol show hostnames`, then its NodeAddr)."""
    names = _scontrol("show", "hostnames", nodelist).split()
    if not names:
        raise WorkspaceError(f"`scontrol show hostnames {nodelist}` named no node")
    found = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", names[0]))
    return found.group(1) if found else names[0]


def _scontrol(*args: str) -> str:
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WorkspaceError(f"`scontrol {' '.join(args)}` failed: {e}") from None
    if done.returncode != 0:
        raise WorkspaceError(f"`scontrol {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _spawn(ctx: StageContext) -> dict:
    """Run the stage in `accelerate launch` (under `srun` for Slurm), streaming its output
    through ``ctx.log``.

    The context goes to stage_main as JSON; the main process writes the metrics that `run`
    returned to the file named by the context's `result` key.
    """
    ctx_json, result = ctx.scratch / "ctx.json", ctx.scratch / "result.json"
    result.unlink(missing_ok=True)
    fields = {k: getattr(ctx, k) for k in ("stage", "inputs", "data", "out", "scratch", "cache", "workdir")}
    ctx_json.write_text(json.dumps({**fields, "result": result}, default=str, indent=2))
    cmd = launch_command(ctx.stage, ctx_json)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            ctx.log(line.rstrip("\n"))
    if proc.returncode != 0:
        raise RuntimeError(f"`{'srun' if cmd[0] == 'srun' else 'accelerate launch'}` exited with status {proc.returncode}")
    if not result.exists():
        raise RuntimeError(f"{STAGE_MAIN} exited without writing {result.name}")
    metrics = json.loads(result.read_text())
    if PREEMPTED in metrics:
        raise preempt.Preempted(metrics[PREEMPTED])
    return metrics


def _checked_metrics(metrics) -> dict:
    """The stage's return value as a JSON-ready dict (None counts as no metrics)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"run(ctx) returned {type(metrics).__name__}, not a dict of metrics")
    try:
        return json.loads(json.dumps(metrics, default=float))
    except (TypeError, ValueError) as e:
        raise TypeError(f"run(ctx) returned metrics that are not JSON numbers or strings: {e}") from None


def _versions() -> dict:
    found = {"python": platform.python_version(), "cascadec": __version__}
    for lib in ("torch", "transformers", "accelerate"):
        try:
            found[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            found[lib] = None
    return found


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _manifest(stage: dict, workdir: Path, tmp: Path, metrics: dict, seconds: float, data_files: dict,
              started_at: str, hub_revisions: dict) -> dict:
    hashes, stats = hash_outputs(tmp, stage)
    return {
        "data_files": data_files,
        "hub_revisions": hub_revisions,
        "stage": stage["id"],
        "hash": stage["hash"],
        "kind": stage["kind"],
        "config": stage.get("config"),
        "launch": stage.get("launch"),
        "inputs": stage.get("inputs"),
        "input_hashes": input_hashes(stage, workdir),
        "outputs": hashes,
        "file_stats": stats,
        "tokens_seen": metrics.get("tokens_seen"),
        "metrics": metrics,
        "versions": _versions(),
        "wall_time_s": round(seconds, 3),
        "started_at": started_at,
        "finished_at": _now(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _store(workdir: Path, sid: str, tmp: Path, manifest: dict) -> None:
    """Write the manifest into ``tmp`` and swap ``tmp`` in for `stages/<id>/` (see top)."""
    atomic_write_json(tmp / MANIFEST, manifest)
    final = stage_dir(workdir, sid)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = temp_dir(workdir, sid, "old") if final.exists() else None
    if old:
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old:
            os.rename(old, final)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _store_stats(workdir: Path, sid: str, manifest: dict, stats: dict) -> None:
    """Refresh a skipped stage's (size, mtime_ns) cache so the next check need not re-hash."""
    with contextlib.suppress(OSError):
        atomic_write_json(stage_dir(workdir, sid) / MANIFEST, {**manifest, "file_stats": stats})
