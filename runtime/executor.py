"""Runs a plan: walks its stages in order, runs those that are not up to date, and stores each
one's outputs atomically with its manifest. Owns the workspace lock; never parses specs.

Whether a stage is up to date is decided by `cascadec.workspace` (pure, shared with `status`).

Storing a stage (old outputs stay intact until the new ones are complete):

    stages/.tmp-<id>-<pid>/   the stage writes here; then outputs hashed, manifest.json written
    stages/<id>/  -> stages/.old-<id>-<pid>/   (only when an earlier version exists)
    stages/.tmp-<id>-<pid>/ -> stages/<id>/    (if this rename fails, the old one is put back)
    stages/.old-<id>-<pid>/   removed;  scratch/<id>/ removed
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from cascadec import __version__
from cascadec.diagnostics import did_you_mean
from cascadec.workspace import (
    LOCK,
    MANIFEST,
    RUN,
    SCRATCH_MARK,
    Digests,
    WorkspaceError,
    atomic_write_json,
    data_names,
    evaluate,
    format_row,
    hash_outputs,
    input_hashes,
    leftovers,
    missing_outputs,
    scratch_dir,
    scratch_hash,
    stage_dir,
    resolve_source,
    summary,
    temp_dir,
    validate_plan,
)

from . import registry
from .context import StageContext

STAGE_MAIN = "cascadec.runtime.stage_main"  # `python -m ... --ctx-json FILE`, one per process


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
    printed as one `error: ...` line; the stages after a failed one are not run.
    """
    workdir, base_dir = Path(workdir), Path(base_dir).resolve()
    try:
        stages = select(plan, only, force)
        forced = {s["id"] for s in stages if _matches(s["id"], force)}
        unrunnable = [f"{why} (stage {st['id']})" for st in stages if (why := registry.missing(st["kind"]))]
        refusal = unrunnable and f"{unrunnable[0]}; --only can select the stages that do not need it"
        if refusal and not dry_run:  # refuse before anything runs, not hours into the plan
            raise WorkspaceError(refusal)
        width = max((len(s["id"]) for s in stages), default=0)
        ran, pending = 0, set()
        digests = Digests(workdir)
        with contextlib.nullcontext() if dry_run else workspace_lock(workdir):
            for st in stages:
                v = evaluate(st, workdir, pending=pending, forced=st["id"] in forced,
                             plan=plan, base_dir=base_dir, digests=digests)
                out(format_row({"stage": st["id"], "state": v.state, "why": v.why, "detail": v.detail}, width))
                if v.state != RUN:
                    if v.fresh_stats and not dry_run:
                        _store_stats(workdir, st["id"], v.manifest, v.fresh_stats)
                elif dry_run:
                    pending.add(st["id"])
                else:
                    run_stage(plan, st, workdir, base_dir, out, digests)
                ran += v.state == RUN
        out(summary(ran, len(stages) - ran, done=not dry_run))
        if refusal:  # a dry run still answers its question (0/2); it says what a real run would refuse
            out(f"warning: a run would refuse to start: {refusal}")
        return 2 if dry_run and ran else 0
    except WorkspaceError as e:
        out(f"error: {e}")
        return 1


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


@contextlib.contextmanager
def workspace_lock(workdir: Path):
    """Hold `WORKDIR/.cascadec.lock` (flock, non-blocking) for one run; it names our PID.

    The kernel drops a flock when its process dies, so a `kill -9` never leaves a stale lock.
    (flock is advisory and per host: two machines sharing an NFS workspace are not stopped.)
    """
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise WorkspaceError(
                f"workspace {workdir} is in use by another cascadec run (pid {holder}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def run_stage(plan: dict, stage: dict, workdir: Path, base_dir: Path, out=print, digests: Digests | None = None) -> None:
    """Run one stage into a temporary directory and store its outputs and manifest.

    Raises WorkspaceError naming the stage when it fails; the previous outputs are untouched,
    the temporary directory is removed and scratch/<id>/ is kept so that a rerun resumes.
    """
    sid = stage["id"]
    inputs, data = resolve_inputs(plan, stage, workdir, base_dir)
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
    tmp = temp_dir(workdir, sid)
    tmp.mkdir(parents=True)
    ctx = StageContext(
        stage=stage, inputs=inputs, data=data, out=tmp, scratch=scratch,
        log=lambda msg: out(f"      {msg}"), cache=Path(workdir) / "cache",
        plan=plan, workdir=Path(workdir),
    )
    started = time.monotonic()
    try:
        try:
            metrics = _spawn(ctx) if needs_launcher(stage) else registry.STAGES[stage["kind"]](ctx)
            metrics = _checked_metrics(metrics)
            if lost := missing_outputs(tmp, stage):
                raise WorkspaceError(f"it did not write its declared output {', '.join(lost)}")
        except Exception as e:
            with contextlib.suppress(OSError):
                (scratch / "traceback.txt").write_text(traceback.format_exc())
            why = str(e) or type(e).__name__
            raise WorkspaceError(f"stage {sid} failed: {why} (traceback in scratch/{sid}/traceback.txt)") from e
        try:
            _store(workdir, sid, tmp, _manifest(stage, workdir, tmp, metrics, time.monotonic() - started, files))
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


def resolve_inputs(plan: dict, stage: dict, workdir: Path, base_dir: Path) -> tuple[dict, dict]:
    """({role: path or hub id}, {data name: source with `paths` expanded}) for a stage.

    Stage inputs are workspace paths; a model's local `source.path` and data globs are
    relative to ``base_dir`` (the spec's directory); globs are expanded and sorted.
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
                inputs[role] = source["hub"]
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
    return launch.get("devices", 1) > 1 or launch.get("launcher") == "accelerate"


def launch_command(stage: dict, ctx_json: Path) -> list[str]:
    """`accelerate launch ... -m cascadec.runtime.stage_main --ctx-json FILE` for this stage.

    Run as `python -m accelerate.commands.launch` so it is this interpreter's accelerate.
    """
    launch = stage.get("launch") or {}
    if launch.get("launcher") == "slurm" or launch.get("nodes", 1) > 1:
        raise WorkspaceError(
            f"stage {stage['id']} is planned for Slurm or several nodes; submit the scripts "
            "from `cascadec plan --emit DIR` instead"
        )
    n = launch.get("devices", 1)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1"]
    cmd += ["--dynamo_backend", "no"]  # stated, so accelerate does not warn about defaults
    # the plan keeps precision in the stage's config (the stage reads it too)
    precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}.get((stage.get("config") or {}).get("precision"))
    if precision:
        cmd += ["--mixed_precision", precision]
    # fsdp: the stage applies FSDP2 itself (training/fsdp.py); Accelerate only starts the processes
    # and their process group, as for ddp (docs/runtime.md, Distributed training)
    if n > 1 and launch.get("strategy") in (None, "none", "ddp", "fsdp"):
        cmd += ["--multi_gpu"]
    return cmd + ["-m", STAGE_MAIN, "--ctx-json", str(ctx_json)]


def _spawn(ctx: StageContext) -> dict:
    """Run the stage in `accelerate launch`, streaming its output through ``ctx.log``.

    The context goes to stage_main as JSON; the main process writes the metrics that `run`
    returned to the file named by the context's `result` key.
    """
    ctx_json, result = ctx.scratch / "ctx.json", ctx.scratch / "result.json"
    result.unlink(missing_ok=True)
    fields = {k: getattr(ctx, k) for k in ("stage", "inputs", "data", "out", "scratch", "cache")}
    ctx_json.write_text(json.dumps({**fields, "result": result}, default=str, indent=2))
    cmd = launch_command(ctx.stage, ctx_json)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            ctx.log(line.rstrip("\n"))
    if proc.returncode != 0:
        raise RuntimeError(f"`accelerate launch` exited with status {proc.returncode}")
    if not result.exists():
        raise RuntimeError(f"{STAGE_MAIN} exited without writing {result.name}")
    return json.loads(result.read_text())


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


def _manifest(stage: dict, workdir: Path, tmp: Path, metrics: dict, seconds: float, data_files: dict) -> dict:
    hashes, stats = hash_outputs(tmp, stage)
    return {
        "data_files": data_files,
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
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
