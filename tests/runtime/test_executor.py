"""The executor end to end with tiny fake stage kinds: what runs and why, --only/--force,
dry-run exit codes, failure and disk-full atomicity, per-stage locks (a stage running elsewhere,
no flock), stop on SIGUSR1 and requeue, accelerate and srun spawning."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cascadec import workspace as ws
from cascadec.runtime import executor, preempt, registry


def stage(sid, needs=(), config=None, kind="write", **extra):
    inputs = [{"role": f"in{i}", "stage": n, "path": f"stages/{n}/out"} for i, n in enumerate(needs)]
    return {
        "id": sid, "kind": kind, "needs": list(needs), "inputs": inputs, "outputs": [f"stages/{sid}/out"],
        "config": config or {"v": 1}, "launch": {"devices": 1, "launcher": "local"}, **extra,
    }


def plan_of(*stages):
    """A plan with Merkle stage hashes, as the compiler makes them."""
    hashes = {}
    for st in stages:
        key = {k: st.get(k) for k in ("kind", "config", "launch", "inputs")}
        key["upstream"] = [hashes[n] for n in st["needs"]]
        st["hash"] = hashes[st["id"]] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return {"spec_sha256": "0" * 64, "models": {}, "data": {}, "stages": list(stages)}


def chain():
    return plan_of(stage("a"), stage("b", ["a"]), stage("c", ["b"]), stage("d"))


@pytest.fixture
def calls(monkeypatch):
    """Registers kind `write`: writes its config and its inputs' content to `out/f`."""
    seen = []

    def write(ctx):
        seen.append(ctx.stage["id"])
        cfg = ctx.config
        if cfg.get("fail"):
            raise ValueError("boom")
        if cfg.get("interrupt"):
            (ctx.scratch / "step-3").write_text("checkpoint")
            raise KeyboardInterrupt
        body = json.dumps(cfg) + "".join((p / "f").read_text() for p in ctx.inputs.values())
        if cfg.get("salt"):
            body += str(len(seen))
        (ctx.out / "out").mkdir()
        (ctx.out / "out" / "f").write_text(body)
        ctx.log(f"resumed from {sorted(p.name for p in ctx.scratch.iterdir() if p.name.startswith('step'))}")
        return {"tokens_seen": 7, "loss": 0.5}

    monkeypatch.setitem(registry.STAGES, "write", write)
    return seen


def run(plan, workdir, **kw):
    lines = []
    rc = executor.run_plan(plan, workdir, workdir, out=lines.append, **kw)
    return rc, [line for line in lines if not line.startswith("      ")]


def test_runs_everything_once_then_nothing(calls, tmp_path):
    plan = chain()
    assert run(plan, tmp_path, dry_run=True) == (
        2, ["run   a  (new)", "run   b  (new)", "run   c  (new)", "run   d  (new)", "4 to run, 0 up to date."]
    )
    assert not (tmp_path / "stages").exists()
    assert run(plan, tmp_path)[0] == 0
    assert calls == ["a", "b", "c", "d"]
    assert run(plan, tmp_path) == (
        0, ["skip  a  (up to date)", "skip  b  (up to date)", "skip  c  (up to date)", "skip  d  (up to date)",
            "0 run, 4 up to date."]
    )
    assert run(plan, tmp_path, dry_run=True)[0] == 0
    assert calls == ["a", "b", "c", "d"]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["a", "b", "c", "d"]
    assert list((tmp_path / "scratch").iterdir()) == []


def test_nested_stage_ids_nest_in_stages_and_leave_no_empty_scratch(calls, tmp_path):
    assert run(plan_of(stage("distill/x/short")), tmp_path)[0] == 0
    assert (tmp_path / "stages/distill/x/short/manifest.json").is_file()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_manifest_records_what_the_stage_did(calls, tmp_path):
    assert run(chain(), tmp_path)[0] == 0
    m = json.loads((tmp_path / "stages" / "b" / "manifest.json").read_text())
    assert m["stage"] == "b" and m["hash"] == chain()["stages"][1]["hash"]
    assert m["outputs"] == {"stages/b/out/f": hashlib.sha256((tmp_path / "stages/b/out/f").read_bytes()).hexdigest()}
    assert m["input_hashes"]["in0"]["stage"] == "a"
    assert (m["tokens_seen"], m["metrics"]) == (7, {"tokens_seen": 7, "loss": 0.5})
    assert set(m["versions"]) == {"python", "cascadec", "torch", "transformers", "accelerate"}
    assert m["wall_time_s"] >= 0


def test_config_change_reruns_the_stage_and_what_it_feeds(calls, tmp_path):
    run(chain(), tmp_path)
    plan = chain()
    plan["stages"][1]["config"] = {"v": 2}
    plan = plan_of(*plan["stages"])
    rc, lines = run(plan, tmp_path)
    assert rc == 0
    assert lines[:4] == [
        "skip  a  (up to date)",
        "run   b  (config changed: config.v)",
        "run   c  (input changed: b changed)",
        "skip  d  (up to date)",
    ]


def test_dry_run_predicts_downstream_reruns(calls, tmp_path):
    run(chain(), tmp_path)
    (tmp_path / "stages/a/out/f").write_text("edited by hand")
    assert run(chain(), tmp_path, dry_run=True) == (2, [
        "run   a  (output modified: stages/a/out/f changed)",
        "run   b  (input changed: a reruns)",
        "run   c  (input changed: b reruns)",
        "skip  d  (up to date)",
        "3 to run, 1 up to date.",
    ])


def test_only_runs_the_targets_and_their_out_of_date_ancestors(calls, tmp_path):
    plan = chain()
    assert run(plan, tmp_path, only=["b"]) == (0, ["run   a  (new)", "run   b  (new)", "2 run, 0 up to date."])
    assert calls == ["a", "b"]
    assert run(plan, tmp_path, only=["c", "d"])[1][:3] == ["skip  a  (up to date)", "skip  b  (up to date)", "run   c  (new)"]
    assert run(plan, tmp_path, only=["*"], dry_run=True)[0] == 0


def test_force_reruns_only_what_it_names_and_downstream_only_if_outputs_differ(calls, tmp_path):
    plan = chain()
    run(plan, tmp_path)
    assert run(plan, tmp_path, force=["a"])[1][:3] == ["run   a  (forced)", "skip  b  (up to date)", "skip  c  (up to date)"]
    salty = plan_of(stage("a", config={"salt": True}), stage("b", ["a"]))
    run(salty, tmp_path)
    assert run(salty, tmp_path, force=["a"])[1][:2] == ["run   a  (forced)", "run   b  (input changed: a changed)"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"only": ["distil/*"]}, "error: --only 'distil/*' matches no stage"),
        ({"only": ["b"], "force": ["d"]}, "error: --force 'd' matches no stage selected by --only"),
        ({"force": ["bb"]}, "error: --force 'bb' matches no stage; did you mean 'b'?"),
    ],
)
def test_globs_that_match_nothing_are_errors(calls, tmp_path, kw, message):
    assert run(chain(), tmp_path, **kw) == (1, [message])
    assert calls == []


def test_a_failing_stage_keeps_the_previous_outputs_and_stops_the_run(calls, tmp_path):
    run(chain(), tmp_path)
    before = (tmp_path / "stages/b/out/f").read_text(), (tmp_path / "stages/b/manifest.json").read_text()
    plan = chain()
    plan["stages"][1]["config"] = {"fail": True}
    rc, lines = run(plan_of(*plan["stages"]), tmp_path)
    assert rc == 1
    assert lines[-1] == "error: stage b failed: boom (traceback in scratch/b/traceback.txt)"
    assert not any(line.startswith(("run   c", "skip  c")) for line in lines)
    assert calls[-1] == "b"
    assert ((tmp_path / "stages/b/out/f").read_text(), (tmp_path / "stages/b/manifest.json").read_text()) == before
    assert [p.name for p in (tmp_path / "stages").iterdir() if p.name.startswith(".")] == []
    assert "ValueError: boom" in (tmp_path / "scratch/b/traceback.txt").read_text()


def test_a_stage_must_write_its_declared_outputs(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.STAGES, "write", lambda ctx: {})
    assert run(plan_of(stage("a")), tmp_path)[1][-1].startswith(
        "error: stage a failed: it did not write its declared output stages/a/out"
    )


def test_an_interrupted_stage_resumes_from_scratch(calls, tmp_path):
    plan = plan_of(stage("a", config={"interrupt": True}))
    with pytest.raises(KeyboardInterrupt):
        run(plan, tmp_path)
    assert [p.name for p in (tmp_path / "stages").iterdir()] == []
    plan["stages"][0]["config"]["interrupt"] = False  # same hash: the next attempt gets through
    (tmp_path / "stages" / ".tmp-a-999999").mkdir()  # as `kill -9` would leave it
    lines = []
    assert executor.run_plan(plan, tmp_path, tmp_path, out=lines.append) == 0
    assert lines[:2] == ["run   a  (interrupted: resumes from scratch/a)", "      resumed from ['step-3']"]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["a"]


def test_a_corrupt_manifest_is_reported_and_the_stage_rerun(calls, tmp_path):
    run(chain(), tmp_path)
    (tmp_path / "stages/d/manifest.json").write_text("{ not json")
    lines = run(chain(), tmp_path)[1]
    assert lines[3].startswith("run   d  (corrupt manifest: stages/d/manifest.json: not valid JSON (")
    assert json.loads((tmp_path / "stages/d/manifest.json").read_text())["stage"] == "d"


def test_unimplemented_kinds_fail_before_anything_runs(calls, monkeypatch, tmp_path):
    monkeypatch.setitem(registry.STAGES, "ghost", registry._lazy("ghost_kind_with_no_module"))
    for kind in ("ghost", "nope"):
        plan = plan_of(stage("a"), stage("b", ["a"], kind=kind))
        message = f"error: stage kind {kind!r} is not implemented in this runtime (stage b); --only can select the stages that do not need it"
        assert run(plan, tmp_path) == (1, [message])
        # --dry-run keeps its promise (0 nothing to do, 2 work pending) and says what a run would refuse
        warning = message.replace("error: ", "warning: a run would refuse to start: ")
        assert run(plan, tmp_path, dry_run=True) == (2, ["run   a  (new)", "run   b  (new)", "2 to run, 0 up to date.", warning])
    assert calls == []


def test_disk_full_while_storing_leaves_the_old_outputs(calls, monkeypatch, tmp_path):
    run(chain(), tmp_path)
    plan = plan_of(stage("a", config={"v": 2}))

    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(executor, "atomic_write_json", full)
    rc, lines = run(plan, tmp_path)
    assert (rc, lines[-1]) == (1, "error: could not store the outputs of stage a: [Errno 28] No space left on device; "
                                  "its previous outputs are unchanged")
    assert json.loads((tmp_path / "stages/a/out/f").read_text()) == {"v": 1}
    assert [p.name for p in (tmp_path / "stages").iterdir() if p.name.startswith(".")] == []


def test_a_failed_rename_into_place_puts_the_old_outputs_back(calls, monkeypatch, tmp_path):
    run(chain(), tmp_path)
    rename = os.rename

    def flaky(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EIO, "I/O error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    assert run(plan_of(stage("a", config={"v": 2})), tmp_path)[0] == 1
    monkeypatch.undo()
    assert json.loads((tmp_path / "stages/a/out/f").read_text()) == {"v": 1}
    assert ws.evaluate(chain()["stages"][0], tmp_path).why == "up to date"


HOLD_LOCK = """
import sys
from pathlib import Path
from cascadec.workspace import stage_lock, temp_dir, scratch_dir
with stage_lock(Path(sys.argv[1]), sys.argv[2]):
    temp_dir(Path(sys.argv[1]), sys.argv[2]).mkdir(parents=True)  # as a run of the stage leaves them
    scratch_dir(Path(sys.argv[1]), sys.argv[2]).mkdir(parents=True)
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds one stage's lock (as a run of it on another node would)."""
    procs = []

    def hold(sid):
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), sid], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "locked\n"
        return proc

    yield hold
    for proc in procs:
        proc.communicate("")


def test_a_stage_running_elsewhere_is_left_alone_and_what_needs_it_waits(calls, holder, tmp_path):
    proc = holder("b")
    who = f"{socket.gethostname()} (pid {proc.pid})"
    assert run(chain(), tmp_path, dry_run=True) == (2, [
        "run   a  (new)", f"busy  b  (running on {who})", "run   c  (new)", "run   d  (new)",
        "3 to run, 0 up to date, 1 running elsewhere."])
    assert ws.status_lines(chain(), tmp_path)[1] == f"busy  b  (running on {who})"
    assert run(chain(), tmp_path) == (1, [
        "run   a  (new)", f"busy  b  (running on {who})", "wait  c  (needs b)", "run   d  (new)",
        "2 run, 0 up to date, 1 running elsewhere, 1 waiting for them.",
        f"error: running elsewhere: b on {who}; not run, as it needs what is running: c; run again once it has finished"])
    assert calls == ["a", "d"]
    # its temporary and scratch folders are its own: nobody took them for leftovers
    assert [p.name for p in (tmp_path / "stages").iterdir() if p.name.startswith(".tmp-b@")] != []
    assert (tmp_path / "scratch" / "b").is_dir()
    proc.communicate("")  # it ends (killed or done: the kernel drops its flock either way)
    assert run(chain(), tmp_path)[1][:3] == ["skip  a  (up to date)", "run   b  (interrupted: starts over)", "run   c  (new)"]
    assert calls == ["a", "d", "b", "c"]
    assert [p.name for p in (tmp_path / "stages").iterdir() if p.name.startswith(".")] == []


SLOW_RUN = """
import json, sys
from pathlib import Path
from cascadec.runtime import executor, registry
def slow(ctx):
    print("started", flush=True)
    sys.stdin.read()
    (ctx.out / "out").mkdir()
    (ctx.out / "out" / "f").write_text("slow")
registry.STAGES["write"] = slow
plan = json.loads(Path(sys.argv[2]).read_text())
sys.exit(executor.run_plan(plan, Path(sys.argv[1]), Path(sys.argv[1]), only=[sys.argv[3]], out=lambda line: None))
"""


def test_independent_stages_run_at_once_from_one_workspace(calls, tmp_path):
    plan = chain()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    slow = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(tmp_path), str(tmp_path / "plan.json"), "a"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert slow.stdout.readline() == "started\n"
    try:
        assert run(plan, tmp_path, only=["d"]) == (0, ["run   d  (new)", "1 run, 0 up to date."])
        assert ws.status_lines(plan, tmp_path)[0] == f"busy  a  (running on {socket.gethostname()} (pid {slow.pid}))"
    finally:
        slow.communicate("")
    assert slow.returncode == 0
    assert run(plan, tmp_path) == (0, ["skip  a  (up to date)", "run   b  (new)", "run   c  (new)", "skip  d  (up to date)",
                                       "2 run, 2 up to date."])


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_filesystem_without_flock_is_a_clear_error_naming_the_mount_option(calls, monkeypatch, tmp_path, code):
    def no_flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ws.fcntl, "flock", no_flock)
    assert run(chain(), tmp_path) == (1, [
        f"error: cannot lock {tmp_path}/locks/a.lock: its filesystem does not support flock "
        f"({errno.errorcode[code]}: {os.strerror(code)}); stages that share a workspace need it to stay apart. "
        "Mount the filesystem with the `flock` option (Lustre: `mount -t lustre -o flock ...`; NFS: not `nolock`), "
        "or put --workdir on one that has it"])
    assert calls == [] and not (tmp_path / "stages").exists()
    assert ws.status_lines(chain(), tmp_path)[0] == "run   a  (new)"  # reading needs no lock


@pytest.fixture
def signals():
    """The executor installs a SIGUSR1 handler: forget what a test asked of it."""
    yield
    preempt.clear()


def test_sigusr1_stops_a_stage_at_its_checkpoint_and_a_rerun_resumes(calls, monkeypatch, signals, tmp_path):
    def train(ctx):
        if not (ctx.scratch / "step-3").exists():
            (ctx.scratch / "step-3").write_text("checkpoint")
            os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm does before the time limit
            assert preempt.requested(ctx.scratch) and (ctx.scratch / preempt.STOP_FILE).exists()
            raise preempt.Preempted(3)
        (ctx.out / "out").mkdir()
        (ctx.out / "out" / "f").write_text("done")

    monkeypatch.setitem(registry.STAGES, "write", train)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    rc, lines = run(chain(), tmp_path)
    assert (rc, lines) == (1, ["run   a  (new)", "error: stopped on request (SIGUSR1) after its step checkpoint of step 3; "
                                                "run again to resume"])
    preempt.clear()  # a new process: the signal was for the one that stopped
    assert run(chain(), tmp_path)[1][0] == "run   a  (interrupted: resumes from scratch/a)"
    assert not (tmp_path / "scratch" / "a").exists()


def test_inside_a_slurm_job_a_stop_requeues_the_job(calls, monkeypatch, signals, tmp_path):
    monkeypatch.setitem(registry.STAGES, "write", lambda ctx: (_ for _ in ()).throw(preempt.Preempted(7)))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    asked = []
    monkeypatch.setattr(executor.subprocess, "run", lambda cmd, **kw: asked.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    lines = []
    assert executor.run_plan(chain(), tmp_path, tmp_path, out=lines.append) == 0
    assert asked == [["scontrol", "requeue", "4242"]]
    assert lines[-1] == ("      stopped on request (SIGUSR1) after its step checkpoint of step 7; "
                         "requeued Slurm job 4242, which resumes there")


def test_inputs_are_resolved_against_the_workspace_and_base_dir(monkeypatch, tmp_path):
    base = tmp_path / "spec"
    for rel in ("models/parent/config.json", "data/b.txt", "data/a.txt", "data/skip.json"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text("x")
    plan = plan_of(stage("s", inputs=[
        {"role": "student", "model": "parent"}, {"role": "data", "data": "corpus"},
    ]))  # a hub model becomes its snapshot folder: tests/runtime/test_hub.py
    plan["models"] = {"parent": {"source": {"path": "models/parent"}}}
    plan["data"] = {"corpus": {"kind": "text", "paths": ["data/*.txt"], "stream": True}}
    seen = {}

    def record(ctx):
        seen.update(inputs=ctx.inputs, data=ctx.data)
        (ctx.out / "out").write_text("done")

    monkeypatch.setitem(registry.STAGES, "write", record)
    assert executor.run_plan(plan, tmp_path / "work", base, out=lambda line: None) == 0
    assert seen["inputs"] == {"student": base.resolve() / "models/parent"}
    assert seen["data"] == {"corpus": {
        "kind": "text", "stream": True, "paths": [base.resolve() / "data/a.txt", base.resolve() / "data/b.txt"],
        "name": "corpus",  # so a reader's error can say `set data.corpus.field`
    }}
    plan["data"]["corpus"]["paths"] = ["data/*.parquet"]
    lines = []
    assert executor.run_plan(plan, tmp_path / "work", base, out=lines.append, force=["s"]) == 1
    assert lines[-1] == f"error: stage s: data 'corpus': no file matches data/*.parquet in {base.resolve()}"


FAKE_STAGE_MAIN = """
import json, sys
ctx = json.load(open(sys.argv[1]))
out = ctx["out"] + "/out"
open(out, "w").write(json.dumps(ctx["inputs"]))
print("rank 0: step 1/1", flush=True)
json.dump({"tokens_seen": 99}, open(ctx["result"], "w"))
sys.exit(int(ctx["stage"]["config"].get("exit", 0)))
"""


def test_multi_device_stages_go_through_accelerate_launch(calls, monkeypatch, tmp_path):
    monkeypatch.setattr(executor, "launch_command", lambda st, ctx_json: [sys.executable, "-c", FAKE_STAGE_MAIN, str(ctx_json)])
    plan = plan_of(stage("a", launch={"devices": 2, "launcher": "accelerate"}))
    lines = []
    assert executor.run_plan(plan, tmp_path, tmp_path, out=lines.append) == 0
    assert "      rank 0: step 1/1" in lines
    assert json.loads((tmp_path / "stages/a/manifest.json").read_text())["tokens_seen"] == 99
    assert calls == []  # it ran in the launched process, not in this one
    failing = plan_of(stage("a", config={"exit": 3}, launch={"devices": 2, "launcher": "accelerate"}))
    assert executor.run_plan(failing, tmp_path, tmp_path, out=lines.append) == 1
    assert lines[-1].startswith("error: stage a failed: `accelerate launch` exited with status 3")


def test_a_grpo_stage_on_several_devices_under_fsdp_is_accepted_and_launched(calls, monkeypatch, tmp_path):
    """grpo runs on several processes (ddp and fsdp: runtime/stages/grpo.py), so the Ministral 3
    spec's grpo stages are not refused: the plan runs and the stage goes through the launcher."""
    launched = []
    monkeypatch.setattr(executor, "launch_command", lambda st, ctx_json: launched.append(st["launch"]) or
                        [sys.executable, "-c", FAKE_STAGE_MAIN, str(ctx_json)])
    late = stage("b", ["a"], kind="grpo", launch={"devices": 8, "nodes": 1, "launcher": "accelerate",
                                                  "strategy": "fsdp"})
    plan = plan_of(stage("a"), late)
    assert run(plan, tmp_path, dry_run=True) == (2, ["run   a  (new)", "run   b  (new)", "2 to run, 0 up to date."])
    assert run(plan, tmp_path)[0] == 0
    assert calls == ["a"] and launched == [late["launch"]]
    assert json.loads((tmp_path / "stages/b/manifest.json").read_text())["tokens_seen"] == 99


def test_launch_command():
    st = stage("a", config={"precision": "bf16"}, launch={"devices": 8, "launcher": "accelerate", "strategy": "fsdp"})
    assert executor.launch_command(st, Path("/w/ctx.json")) == [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "8", "--num_machines", "1",
        "--dynamo_backend", "no", "--mixed_precision", "bf16",
        "--multi_gpu", "-m", "cascadec.runtime.stage_main", "--ctx-json", "/w/ctx.json",
    ]  # fsdp: FSDP2 is applied by the stage itself (training/fsdp.py), not by Accelerate's plugin
    assert "--multi_gpu" in executor.launch_command(stage("a", launch={"devices": 2, "strategy": "ddp"}), Path("c"))
    assert not executor.needs_launcher(stage("a"))
    with pytest.raises(ws.WorkspaceError, match=r"^stage a is planned for Slurm on 2 nodes; submit its job "
                       r"\(slurm/\*\.sbatch from `cascadec plan --emit DIR`\), which runs this same command inside"):
        executor.launch_command(stage("a", launch={"devices": 8, "nodes": 2, "launcher": "slurm"}), Path("c"), env={})


def test_launch_command_inside_a_slurm_job_runs_one_launcher_per_node(monkeypatch):
    answers = {("show", "hostnames", "gpu[07-08]"): "gpu07\ngpu08\n",
               ("show", "node", "-o", "gpu07"): "NodeName=gpu07 Arch=x86_64 NodeAddr=10.1.0.7 NodeHostName=gpu07\n"}
    monkeypatch.setattr(executor, "_scontrol", lambda *args: answers[args])
    st = stage("a", launch={"devices": 16, "nodes": 2, "launcher": "slurm", "strategy": "fsdp"})
    cmd = executor.launch_command(st, Path("/w/ctx.json"), env={"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "16", "--num_machines", "2",
                "--main_process_ip", "10.1.0.7", "--main_process_port", "23456", "--dynamo_backend", "no", "--multi_gpu"]
    assert cmd == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c",
                   'exec "${@:1:14}" --machine_rank "$SLURM_NODEID" "${@:15}"', "launch",
                   *launcher, "-m", "cascadec.runtime.stage_main", "--ctx-json", "/w/ctx.json"]
    # what each task's shell runs: the launcher, its machine rank, then the module
    shown = subprocess.run([*cmd[5:9], "echo", *cmd[10:]], env={"SLURM_NODEID": "1", "PATH": os.environ["PATH"]},
                           capture_output=True, text=True, check=True).stdout.split()  # echo in place of python
    assert shown == [*launcher[1:], "--machine_rank", "1", "-m", "cascadec.runtime.stage_main", "--ctx-json", "/w/ctx.json"]
    one = stage("a", launch={"devices": 4, "nodes": 1, "launcher": "slurm", "strategy": "ddp"})
    assert executor.launch_command(one, Path("c"), env={"SLURM_JOB_ID": "9"})[:6] == [
        "srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable]


def test_editing_one_data_file_reruns_exactly_the_stages_that_read_it(calls, monkeypatch, tmp_path):
    """Issue 8, content in "up to date": a stage's data files are part of its inputs (size and
    mtime first, sha256 when they moved); `status` names the file; nothing unchanged is re-read."""
    base, work = tmp_path / "spec", tmp_path / "work"

    def cat(ctx):  # its output is its data, as a tokenize stage's is
        calls.append(ctx.stage["id"])
        ctx.out.joinpath("out").mkdir()
        ctx.out.joinpath("out", "f").write_text("".join(p.read_text() for d in ctx.data.values() for p in d["paths"]))

    monkeypatch.setitem(registry.STAGES, "cat", cat)
    for rel in ("a/1.txt", "a/2.txt", "b/1.txt"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(f"text of {rel}")
    plan = plan_of(stage("read-a", kind="cat", inputs=[{"role": "data", "data": "A"}]),
                   stage("read-b", kind="cat", inputs=[{"role": "data", "data": "B"}]), stage("after-a", ["read-a"]))
    plan["data"] = {"A": {"kind": "text", "paths": ["a/*.txt"]}, "B": {"kind": "text", "paths": ["b/*.txt"]}}
    assert executor.run_plan(plan, work, base, out=lambda line: None) == 0
    manifest = ws.read_manifest(work, "read-a")
    two = str((base / "a/2.txt").resolve())
    assert manifest["data_files"]["A"][two] == hashlib.sha256(b"text of a/2.txt").hexdigest()

    reads = []
    real = ws._sha256
    monkeypatch.setattr(ws, "_sha256", lambda p: reads.append(Path(p).name) or real(p))
    assert ws.status_lines(plan, work, base)[-1] == "0 to run, 3 up to date."
    assert reads == []  # (size, mtime_ns) unchanged: no data file was read again

    (base / "a/2.txt").write_text("edited text of a/2.txt")
    assert [line.split()[:2] for line in ws.status_lines(plan, work, base)[:3]] == [
        ["run", "read-a"], ["skip", "read-b"], ["run", "after-a"]]
    assert f"(input changed: data 'A': {two} changed)" in ws.status_lines(plan, work, base)[0]
    assert reads == ["2.txt"]  # the edited file only, once (cached on disk by its new mtime)
    calls.clear()
    lines = []
    assert executor.run_plan(plan, work, base, out=lines.append) == 0
    assert calls == ["read-a", "after-a"]
    assert ws.status_lines(plan, work, base)[-1] == "0 to run, 3 up to date."
    (base / "b/2.txt").write_text("a new file")
    assert ws.status_lines(plan, work, base)[1].endswith(f"(input changed: data 'B': {(base / 'b/2.txt').resolve()} added)")
