"""The workspace model: why each stage runs or is skipped, manifests, saved-plan staleness.

Pure tests (no torch): workspaces are written by hand the way the executor leaves them.
Stage hashes are plain strings here; only their equality matters to the workspace.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from cascadec import workspace as ws

PRUNE = {
    "id": "prune/a",
    "kind": "prune",
    "needs": [],
    "inputs": [{"role": "model", "model": "parent"}],
    "outputs": ["stages/prune/a/model"],
    "config": {"target": {"layers": 2}, "methods": {"layers": "norm_ratio"}},
    "launch": {"devices": 1, "launcher": "local"},
    "hash": "h-prune-1",
}
DISTILL = {
    "id": "distill/a/short",
    "kind": "distill",
    "needs": ["prune/a"],
    "inputs": [{"role": "student", "stage": "prune/a", "path": "stages/prune/a/model"}],
    "outputs": ["stages/distill/a/short/model"],
    "config": {"optimizer": {"lr": 0.001}},
    "launch": {"devices": 1, "launcher": "local"},
    "hash": "h-distill-1",
}


@pytest.fixture
def plan():
    return {"spec_sha256": hashlib.sha256(b"spec").hexdigest(), "stages": copy.deepcopy([PRUNE, DISTILL])}


def complete(workdir, stage, files=None):
    """Leave ``stage`` as a finished run would: its outputs, then its manifest."""
    root = ws.stage_dir(workdir, stage["id"])
    for rel, text in (files or {"model/config.json": "{}", "model/w.bin": stage["hash"]}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    hashes, stats = ws.hash_outputs(root, stage)
    manifest = {k: stage[k] for k in ("kind", "config", "launch", "inputs", "hash")}
    manifest.update(stage=stage["id"], input_hashes=ws.input_hashes(stage, workdir), outputs=hashes, file_stats=stats)
    ws.atomic_write_json(root / ws.MANIFEST, manifest)


def reasons(plan, workdir):
    return {r["stage"]: (r["state"], r["why"], r["detail"]) for r in ws.status_table(plan, workdir)}


def test_new_then_up_to_date(plan, tmp_path):
    assert reasons(plan, tmp_path) == {"prune/a": ("run", "new", ""), "distill/a/short": ("run", "new", "")}
    for st in plan["stages"]:
        complete(tmp_path, st)
    assert reasons(plan, tmp_path) == {
        "prune/a": ("skip", "up to date", ""),
        "distill/a/short": ("skip", "up to date", ""),
    }
    v = ws.plan_verdicts(plan, tmp_path)[plan["stages"][1]["id"]]
    assert (v.state, v.why) == ("skip", "up to date")


def test_config_change_names_the_key_and_reruns_downstream(plan, tmp_path):
    for st in plan["stages"]:
        complete(tmp_path, st)
    prune, distill = plan["stages"]
    prune["config"]["target"]["layers"] = 3
    prune["hash"], distill["hash"] = "h-prune-2", "h-distill-2"  # Merkle: downstream hash moves too
    assert reasons(plan, tmp_path) == {
        "prune/a": ("run", "config changed", "config.target.layers"),
        "distill/a/short": ("run", "input changed", "prune/a reruns"),
    }


def test_launch_change_is_a_config_change(plan, tmp_path):
    complete(tmp_path, plan["stages"][0])
    plan["stages"][0]["launch"]["devices"] = 8
    plan["stages"][0]["hash"] = "h-prune-2"
    assert reasons(plan, tmp_path)["prune/a"] == ("run", "config changed", "launch.devices")


def test_hash_change_without_own_config_change_is_an_input_change(plan, tmp_path):
    complete(tmp_path, plan["stages"][0])
    plan["stages"][0]["inputs"] = [{"role": "model", "model": "other-parent"}]
    plan["stages"][0]["hash"] = "h-prune-2"
    assert reasons(plan, tmp_path)["prune/a"] == ("run", "input changed", "input 'model' changed")


def test_upstream_outputs_that_differ_from_those_used_rerun_downstream(plan, tmp_path):
    prune, distill = plan["stages"]
    complete(tmp_path, prune)
    complete(tmp_path, distill)
    complete(tmp_path, prune, {"model/config.json": "{}", "model/w.bin": "rerun with other bytes"})
    assert reasons(plan, tmp_path) == {
        "prune/a": ("skip", "up to date", ""),
        "distill/a/short": ("run", "input changed", "prune/a changed"),
    }


@pytest.mark.parametrize(
    "damage, detail",
    [
        (lambda m: m.joinpath("w.bin").write_text("edited by hand"), "stages/prune/a/model/w.bin changed"),
        (lambda m: m.joinpath("extra.txt").write_text("x"), "stages/prune/a/model/extra.txt added"),
        (lambda m: m.joinpath("w.bin").unlink(), "stages/prune/a/model/w.bin removed"),
        (lambda m: [p.unlink() for p in m.iterdir()] and m.rmdir(), "stages/prune/a/model removed"),
    ],
    ids=["edited", "added", "file-removed", "output-removed"],
)
def test_output_modified(plan, tmp_path, damage, detail):
    for st in plan["stages"]:
        complete(tmp_path, st)
    damage(ws.stage_dir(tmp_path, "prune/a") / "model")
    assert reasons(plan, tmp_path) == {
        "prune/a": ("run", "output modified", detail),
        "distill/a/short": ("run", "input changed", "prune/a reruns"),
    }


def test_file_hashes_are_cached_by_size_and_mtime(plan, tmp_path):
    prune = plan["stages"][0]
    complete(tmp_path, prune)
    w = ws.stage_dir(tmp_path, "prune/a") / "model" / "w.bin"
    st = w.stat()
    w.write_text("h-prune-X")  # same size, different bytes
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Unchanged (size, mtime_ns): the cached hash is trusted, exactly as documented.
    assert ws.evaluate(prune, tmp_path).why == "up to date"
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ws.evaluate(prune, tmp_path).why == "output modified"


def test_a_touched_file_is_rehashed_and_its_stats_offered_for_the_cache(plan, tmp_path):
    prune = plan["stages"][0]
    complete(tmp_path, prune)
    w = ws.stage_dir(tmp_path, "prune/a") / "model" / "w.bin"
    os.utime(w, ns=(0, w.stat().st_mtime_ns + 10**9))
    v = ws.evaluate(prune, tmp_path)
    assert (v.state, v.why) == ("skip", "up to date")
    assert v.fresh_stats["stages/prune/a/model/w.bin"][1] == w.stat().st_mtime_ns


def test_interrupted(plan, tmp_path):
    prune, distill = plan["stages"]
    scratch = ws.scratch_dir(tmp_path, prune["id"])
    scratch.mkdir(parents=True)
    (scratch / ws.SCRATCH_MARK).write_text(prune["hash"])
    (tmp_path / "stages" / f".tmp-{ws.safe_id(distill['id'])}-4242").mkdir(parents=True)
    assert reasons(plan, tmp_path) == {
        "prune/a": ("run", "interrupted", "resumes from scratch/prune/a"),
        "distill/a/short": ("run", "interrupted", "starts over"),
    }


def test_scratch_of_another_stage_hash_is_not_a_resume(plan, tmp_path):
    complete(tmp_path, plan["stages"][0])
    scratch = ws.scratch_dir(tmp_path, "prune/a")
    scratch.mkdir(parents=True)
    (scratch / ws.SCRATCH_MARK).write_text("h-prune-1")
    plan["stages"][0]["config"]["target"]["layers"] = 3
    plan["stages"][0]["hash"] = "h-prune-2"
    assert reasons(plan, tmp_path)["prune/a"][1] == "config changed"
    # ...and a temp dir of a stage whose id merely starts the same is not ours.
    (tmp_path / "stages" / ".tmp-prune--a-b-77").mkdir()
    assert reasons(plan, tmp_path)["prune/a"][1] == "config changed"


@pytest.mark.parametrize(
    "text, detail",
    [
        ('{"stage": "prune/a", ', "stages/prune/a/manifest.json: not valid JSON (Expecting"),
        ('{"stage": "prune/a"}', "stages/prune/a/manifest.json: missing 'hash', 'kind'"),
        ("[1, 2]", "stages/prune/a/manifest.json: not a JSON object"),
    ],
)
def test_corrupt_manifest_is_a_reason_not_a_traceback(plan, tmp_path, text, detail):
    complete(tmp_path, plan["stages"][0])
    (ws.stage_dir(tmp_path, "prune/a") / ws.MANIFEST).write_text(text)
    state, why, got = reasons(plan, tmp_path)["prune/a"]
    assert (state, why) == ("run", "corrupt manifest")
    assert got.startswith(detail)


def test_check_saved_plan(plan):
    assert ws.check_saved_plan(plan, b"spec") is None
    stale = ws.check_saved_plan(plan, b"spec, edited")
    assert stale.startswith("saved plan is stale: the spec changed since the plan was made")
    assert "`cascadec plan SPEC -o PLAN`" in stale and "--replan" in stale
    assert "no spec_sha256" in ws.check_saved_plan({"stages": []}, b"spec")
    quiet = ws.check_saved_plan(plan, b"spec, edited", advice=False)
    assert stale.startswith(quiet) and quiet.endswith(").") and "--replan" not in quiet


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s[1].update(id="prune/a/b", outputs=["stages/prune/a/b/m"]), "plan stage ids 'prune/a' and 'prune/a/b' nest"),
        (lambda s: s[1].update(id="../x"), "plan stage id '../x' is not a safe relative path"),
        (lambda s: s[1].update(id=".tmp-x"), "plan stage id '.tmp-x' is not a safe relative path"),
        (lambda s: s[1].update(outputs=["stages/prune/a/model"]), "plan stage 'distill/a/short': output 'stages/prune/a/model' must lie under stages/distill/a/short/"),
        (lambda s: s[1].update(outputs=["stages/distill/a/short/manifest.json"]), "plan stage 'distill/a/short': output"),
        (lambda s: s.reverse(), "plan stage 'distill/a/short' needs 'prune/a', which is not an earlier stage"),
        (lambda s: s[1].pop("hash"), "plan stage #1 lacks 'hash'"),
    ],
)
def test_plans_the_executor_refuses(plan, edit, message):
    edit(plan["stages"])
    with pytest.raises(ws.WorkspaceError, match="^" + re.escape(message)):
        ws.validate_plan(plan)


def test_format_row():
    row = {"stage": "distill/x/short", "state": "run", "why": "config changed", "detail": ""}
    assert ws.format_row(row) == "run   distill/x/short  (config changed)"
    assert ws.format_row({**row, "state": "skip", "why": "up to date", "stage": "prune/x"}, 15) == (
        "skip  prune/x          (up to date)"
    )
    assert ws.format_row({**row, "detail": "config.lr"}).endswith("(config changed: config.lr)")


def test_workspace_never_imports_torch():
    code = "import sys, cascadec.workspace; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate'))))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
