"""The command line as users see it: help text (pinned), exit codes, outputs, launch scripts,
import hygiene (no torch), and bad saved plans.

The help snapshots live in tests/golden/cli/; a new or renamed flag fails here until the
snapshot is regenerated on purpose with `pytest --update-goldens`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from compilerkit import GOLDEN, REPO, cascadec, cascadec_subprocess, check_golden

TINY = REPO / "specs" / "tiny.yaml"
COMMANDS = ["init", "validate", "plan", "graph", "diff", "run", "status", "report"]  # `prune` is the runtime's own CLI


@pytest.fixture
def workdir(tmp_path):
    """tmp_path holding a copy of the tiny spec (as spec.yaml), as the current directory."""
    shutil.copy(TINY, tmp_path / "spec.yaml")
    return tmp_path


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_pinned(command, update_goldens, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal
    run = cascadec(*([command] if command else []), "--help")
    assert run.code == 0
    check_golden(GOLDEN / "cli" / f"{command or 'cascadec'}.help.txt", run.out, update_goldens)


def test_every_subcommand_is_pinned():
    run = cascadec("--help")
    listed = re.search(r"\{([a-z,]+)\}", run.out) or re.findall(r"^    ([a-z]+) ", run.out, re.M)
    names = listed.group(1).split(",") if hasattr(listed, "group") else listed
    assert sorted(names) == sorted([*COMMANDS, "prune"])


def test_version():
    run = cascadec("--version")
    assert run.code == 0 and re.fullmatch(r"cascadec \d+\.\d+\.\d+\n", run.out)


# -- exit codes -----------------------------------------------------------------------------------

def test_exit_codes(workdir):
    assert cascadec("validate", "spec.yaml", cwd=workdir).code == 0
    (workdir / "bad.yaml").write_text("cascadec: 1\nfamily: x\n")
    bad = cascadec("validate", "bad.yaml", cwd=workdir)
    assert bad.code == 1 and "error[CSC102]" in bad.err
    assert cascadec("validate", "spec.yaml", "bad.yaml", cwd=workdir).code == 1  # any error fails the run
    for usage in ([], ["plan"], ["plan", "spec.yaml", "--bogus"], ["graph", "spec.yaml", "--format", "svg"],
                  ["frobnicate"]):
        run = cascadec(*usage, cwd=workdir)
        assert run.code == 2, usage
        assert "usage: cascadec" in run.err


def test_exit_codes_of_the_real_process(workdir):
    assert cascadec_subprocess("validate", "spec.yaml", cwd=workdir).code == 0
    assert cascadec_subprocess("plan", "nope.yaml", cwd=workdir).code == 1
    usage = cascadec_subprocess("plan", cwd=workdir)
    assert usage.code == 2 and "Traceback" not in usage.err


# -- plan output -------------------------------------------------------------------------------------

def test_plan_json_on_stdout_equals_the_written_plan(workdir):
    stdout = cascadec("plan", "spec.yaml", "--format", "json", cwd=workdir)
    written = cascadec("plan", "spec.yaml", "-o", "plan.json", cwd=workdir)
    assert stdout.code == written.code == 0
    assert (workdir / "plan.json").read_text() == stdout.out
    assert written.out.endswith("wrote plan.json\n")
    assert json.loads(stdout.out)["spec_file"] == "spec.yaml"


def test_plan_text_is_a_table(workdir):
    run = cascadec("plan", "spec.yaml", cwd=workdir)
    assert run.code == 0
    plan = json.loads(cascadec("plan", "spec.yaml", "--format", "json", cwd=workdir).out)
    for stage in plan["stages"]:
        assert re.search(rf"^{re.escape(stage['id'])} +{stage['kind']} ", run.out, re.M)
    assert re.search(r"^totals: \d+ stages", run.out, re.M)


def test_plan_table_is_pinned(update_goldens):
    run = cascadec("plan", "specs/ministral3.yaml")
    assert (run.code, run.err) == (0, "")
    check_golden(GOLDEN / "cli" / "plan.ministral3.txt", run.out, update_goldens)


def test_plan_table_groups_rows_per_child_and_explains_its_notations():
    out = cascadec("plan", "specs/ministral3.yaml").out
    plan = json.loads(cascadec("plan", "specs/ministral3.yaml", "--format", "json").out)
    lines = out.splitlines()
    assert "shape: L layers, h hidden, f FFN; 32/8x128 = 32 query heads, 8 KV heads, head_dim 128; tied/untied embeddings" in lines
    titles = [line for line in lines if line.startswith("# ")]
    assert titles == ["# family-wide stages",
                      "# ministral-3-14b: 13.51B parameters, cut from mistral-small-3.1",
                      "# ministral-3-8b: 8.49B parameters, cut from ministral-3-14b/short",
                      "# ministral-3-3b: 3.43B parameters, cut from ministral-3-8b/short"]
    # every row under a child's title belongs to that child, and every stage has its row
    section, seen = None, []
    for line in lines:
        if line.startswith("# "):
            section = line[2:].split(":")[0]
        elif section and line and not line.startswith(("eval tokens:", "totals:")) and "/" in line.split()[0]:
            seen.append(line.split()[0])
            assert section == "family-wide stages" or line.split()[0].split("/")[1] == section, line
        elif section and not line:
            continue
        elif section:
            break
    assert sorted(seen) == sorted(s["id"] for s in plan["stages"])
    # eval tokens say how many checkpoints they multiply
    assert re.search(r"^eval/ministral-3-14b +eval +9x10\.00M ", out, re.M)
    assert "eval tokens: N x T = N checkpoints scored, T held-out tokens each (all counted in the FLOPs)" in lines


def test_plan_into_a_subdirectory_points_back_at_the_spec(workdir):
    assert cascadec("plan", "spec.yaml", "-o", "plans/deep/plan.json", cwd=workdir).code == 0
    plan = json.loads((workdir / "plans" / "deep" / "plan.json").read_text())
    assert plan["spec_file"] == "../../spec.yaml"


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".cascadec-"))


def test_plan_output_is_untouched_by_a_failed_compile(workdir):
    (workdir / "plan.json").write_text("previous plan\n")
    (workdir / "bad.yaml").write_text("cascadec: 1\n")
    run = cascadec("plan", "bad.yaml", "-o", "plan.json", cwd=workdir)
    assert run.code == 1
    assert (workdir / "plan.json").read_text() == "previous plan\n"
    assert _leftovers(workdir) == []


def test_plan_output_is_written_atomically(workdir, monkeypatch):
    """A failure while the new plan is being put in place leaves the old file and no temp file."""
    (workdir / "plan.json").write_text("previous plan\n")

    def fail(src, dst):
        raise OSError(28, "No space left on device", dst)

    monkeypatch.setattr(os, "replace", fail)
    run = cascadec("plan", "spec.yaml", "-o", "plan.json", cwd=workdir)
    monkeypatch.undo()
    assert run.code == 1 and "No space left on device" in run.err and "Traceback" not in run.err
    assert (workdir / "plan.json").read_text() == "previous plan\n"
    assert _leftovers(workdir) == []


def test_plan_output_onto_a_directory(workdir):
    (workdir / "out").mkdir()
    run = cascadec("plan", "spec.yaml", "-o", "out", cwd=workdir)
    assert run.code == 1 and "Traceback" not in run.err
    assert _leftovers(workdir) == [] and list((workdir / "out").iterdir()) == []


# -- launch scripts ------------------------------------------------------------------------------------

def test_emit_renders_shell_and_slurm_scripts(workdir):
    run = cascadec("plan", "spec.yaml", "-o", "plan.json", "--emit", "launch", cwd=workdir)
    assert run.code == 0, run.err
    plan = json.loads((workdir / "plan.json").read_text())
    launch = workdir / "launch"
    run_sh, submit_sh = (launch / "run.sh").read_text(), (launch / "submit.sh").read_text()
    sbatch = {p.name: p.read_text() for p in (launch / "slurm").glob("*.sbatch")}
    assert len(sbatch) == len(plan["stages"])
    for stage in plan["stages"]:
        sid = stage["id"]
        assert f"--only {sid}\n" in run_sh or f"--only '{sid}'\n" in run_sh
        assert f"submitted {sid} as job" in submit_sh
        script = sbatch[sid.replace("/", "--") + ".sbatch"]
        assert f"stage {sid} ({stage['kind']})" in script
        line = next(x for x in submit_sh.splitlines() if x.startswith("JOB[") and f"slurm/{sid.replace('/', '--')}.sbatch" in x)
        if stage["needs"]:
            deps = re.search(r"--dependency=afterok((?::\$\{JOB\[[^]]+\]\})+)", line)
            assert deps, line
            assert re.findall(r"JOB\['?([^]']+)'?\]", deps.group(1)) == stage["needs"]
        else:
            assert "--dependency" not in line
    # every stage's jobs are submitted after the jobs it waits for
    order = [re.match(r"JOB\['?([^]']+)'?\]=", x).group(1) for x in submit_sh.splitlines() if x.startswith("JOB[")]
    assert order == [s["id"] for s in plan["stages"]]
    # paths in the scripts are relative to the script directory, which they cd into
    assert 'PLAN="${PLAN:-../plan.json}"' in run_sh and 'WORKDIR="${WORKDIR:-../runs/tiny}"' in run_sh
    assert 'cd "$(dirname "$0")"' in run_sh and 'cd "$(dirname "$0")"' in submit_sh
    for path in [launch / "run.sh", launch / "submit.sh", *(launch / "slurm").glob("*.sbatch")]:
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, (path.name, check.stderr)
        assert os.access(path, os.X_OK)


def test_emit_replaces_the_directory_whole(workdir):
    (workdir / "launch" / "slurm").mkdir(parents=True)
    (workdir / "launch" / "slurm" / "stale.sbatch").write_text("old\n")
    assert cascadec("plan", "spec.yaml", "--emit", "launch", cwd=workdir).code == 0
    assert not (workdir / "launch" / "slurm" / "stale.sbatch").exists()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".cascadec")] == []


# -- graph ------------------------------------------------------------------------------------------------

GRAPHED = ["ministral3", "tiny"]


@pytest.mark.parametrize("fmt", ["mermaid", "dot", "ascii"])
@pytest.mark.parametrize("name", GRAPHED)
def test_graph_is_pinned(name, fmt, update_goldens):
    run = cascadec("graph", f"specs/{name}.yaml", "--format", fmt)
    assert (run.code, run.err) == (0, "")
    check_golden(GOLDEN / "cli" / f"graph.{name}.{fmt}.txt", run.out, update_goldens)


@pytest.mark.parametrize("name", GRAPHED)
def test_graph_draws_models_data_teachers_and_one_group_per_child(name):
    plan = json.loads(cascadec("plan", f"specs/{name}.yaml", "--format", "json").out)
    children = [n for n, m in plan["models"].items() if m["role"] == "child"]
    inputs = [(i, s) for s in plan["stages"] for i in s["inputs"]]
    teaching = sum(i["role"] in ("teacher", "teacher_logits") for i, _ in inputs)
    judging = sum(i["role"].startswith("judge:") for i, _ in inputs)
    data = sum(i["role"] in ("data", "tokens") for i, _ in inputs)  # dotted: a source read, as files or as tokens
    assert teaching and data
    dot = cascadec("graph", f"specs/{name}.yaml", "--format", "dot").out
    assert dot.startswith("digraph plan {\n") and dot.endswith("}\n")
    assert dot.count(" -> ") == len(inputs)  # one edge per stage input
    assert dot.count('[label="teaches"') == teaching and dot.count('[label="judges"') == judging
    assert dot.count("[style=dotted]") == data
    assert dot.count("subgraph cluster_") == len(children)
    for c in children:
        assert f'label="{c} · ' in dot
    for m, spec in plan["models"].items():
        if spec["role"] != "child":
            assert f'"model:{m}" [label="{m} · {spec["role"]} · ' in dot
    for s in plan["stages"]:
        if s["kind"] != "bootstrap":  # a bootstrapped model is drawn as the model
            assert f'  "{s["id"]}" [label=' in dot
    mermaid = cascadec("graph", f"specs/{name}.yaml").out
    assert mermaid.startswith("flowchart TD\n")
    assert mermaid.count("==>|teaches|") == teaching and mermaid.count("-.->|judges|") == judging
    assert mermaid.count("  subgraph ") == len(children) and mermaid.count("\n  end\n") == len(children)
    assert sum(mermaid.count(f" {arrow} ") for arrow in ("-->", "==>|teaches|", "-.->|judges|", "-.->")) == len(inputs)


def test_graph_ascii_reads_as_the_cascade():
    out = cascadec("graph", "specs/ministral3.yaml", "--format", "ascii").out.splitlines()
    assert out[0] == "family 'ministral3': mistral-small-3.1 -> ministral-3-14b -> ministral-3-8b -> ministral-3-3b"
    assert out[2] == "mistral-small-3.1 (parent+teacher, 23.57B)"
    assert out[3] == "`-- ministral-3-14b (13.51B): cut from mistral-small-3.1 (ffn 32768 -> 16384)"
    assert "    `-- ministral-3-8b (8.49B): cut from ministral-3-14b/short (layers 40 -> 34, hidden 5120 -> 4096, " \
           "ffn 16384 -> 14336)" in out
    assert "  mistral-small-3.1    => ministral-3-14b (short, long), ministral-3-8b (short, long), " \
           "ministral-3-3b (short, long)" in out
    assert "  magistral-small-1.2  => ministral-3-3b (reasoning/sft)" in out


# -- import hygiene ----------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "accelerate", "safetensors")


def test_the_cli_never_imports_torch(tmp_path):
    script = (
        "import sys\n"
        "import cascadec.cli\n"
        f"assert not any(m in sys.modules for m in {HEAVY!r}), 'imported by import cascadec.cli'\n"
        "from cascadec.cli import main\n"
        f"for argv in (['plan', {str(REPO / 'specs' / 'ministral3.yaml')!r}, '-o', 'plan.json', '--emit', 'launch'],\n"
        f"             ['validate', {str(TINY)!r}], ['graph', {str(TINY)!r}], ['diff', 'plan.json', 'plan.json'],\n"
        "             ['status', 'plan.json', '--workdir', 'ws']):  # ministral3's hub models: status resolves them\n"
        "    assert main(argv) == 0, argv\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"


# -- bad saved plans ------------------------------------------------------------------------------------------

@pytest.fixture
def saved(workdir):
    assert cascadec("plan", "spec.yaml", "-o", "plan.json", cwd=workdir).code == 0
    return workdir / "plan.json"


def _edit_plan(text: str, change) -> str:
    plan = json.loads(text)
    change(plan)
    return json.dumps(plan)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[: len(t) // 2], r"plan\.json:\d+:\d+: not valid JSON: "),
    (lambda t: "", r"plan\.json:1:1: not valid JSON: Expecting value"),
    (lambda t: _edit_plan(t, lambda p: p["stages"][0].update(hash=7)), r"not a valid cascadec plan: at stages/0/hash: 7 is not of type 'string'"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "stages"}), r"not a valid cascadec plan: at top level: 'stages' is a required property"),
    (lambda t: "[1, 2]", r"not a valid cascadec plan: at top level: \[1, 2\] is not of type 'object'"),
], ids=["truncated", "empty", "wrong-type", "missing-stages", "not-an-object"])
@pytest.mark.parametrize("command", [["diff", "plan.json", "spec.yaml"], ["status", "plan.json"]], ids=["diff", "status"])
def test_corrupted_saved_plan(saved, damage, message, command):
    saved.write_text(damage(saved.read_text()))
    run = cascadec_subprocess(*command, cwd=saved.parent)
    assert run.code in (1, 2) and "Traceback" not in run.err
    assert re.search(message, run.err), run.err
    assert "= help: regenerate it with `cascadec plan SPEC -o PLAN`" in run.err


def test_binary_saved_plan(saved):
    saved.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    run = cascadec("diff", "plan.json", "plan.json", cwd=saved.parent)
    assert run.code == 2 and "cannot read" in run.err


# -- saved-plan staleness and dry runs -----------------------------------------------------------------------

def test_status_says_when_the_saved_plan_is_stale(saved):
    fresh = cascadec("status", "plan.json", "--workdir", "w", cwd=saved.parent)
    assert fresh.code == 0 and fresh.err == ""
    spec = saved.parent / "spec.yaml"
    spec.write_text(spec.read_text().replace("seed: 0", "seed: 1"))
    stale = cascadec("status", "plan.json", "--workdir", "w", cwd=saved.parent)
    assert stale.code == 0
    then, now = json.loads(saved.read_text())["spec_sha256"][:12], _sha256(spec)[:12]
    assert stale.err == (
        f"warning: plan.json: saved plan is stale: the spec changed since the plan was made (plan from spec sha256 "
        f"{then}, spec is now {now}). Using a fresh plan of spec.yaml.\n"
        "  = help: `cascadec plan spec.yaml -o plan.json` updates the saved plan (review its diff with "
        "`cascadec diff plan.json spec.yaml`)\n")
    assert stale.out == cascadec("status", "spec.yaml", "--workdir", "w", cwd=saved.parent).out
    refused = cascadec("run", "plan.json", "--workdir", "w", "--dry-run", cwd=saved.parent)  # run still refuses
    assert refused.code == 1 and "error: plan.json: saved plan is stale" in refused.err


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dry_run_of_a_plan_with_post_training_stages_exits_2(tmp_path):
    """ministral3 has SFT, ODPO and GRPO stages (grpo on 256 devices under fsdp): --dry-run answers
    0/2 as promised, and a real run of this install would refuse none of them."""
    run = cascadec_subprocess("run", str(REPO / "specs" / "ministral3.yaml"), "--dry-run", "--workdir", "w", cwd=tmp_path)
    assert run.code == 2, run.err
    lines = run.out.splitlines()
    assert [line for line in lines if line.endswith("up to date.")] == ["45 to run, 0 up to date."]
    assert {line.split()[1].split("/")[0] for line in lines if line.startswith("run ")} >= {"sft", "odpo", "grpo"}
    assert [line for line in lines if line.startswith("warning:")] == []  # every kind runs on its launch
    assert not (tmp_path / "w").exists()  # a dry run writes nothing
