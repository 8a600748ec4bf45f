"""End to end: a smaller variant of the embedded default, run by the real CLI in a subprocess.

Bootstraps a parent on the standard library, cuts three children, distills each from the parent
and trains a from-scratch control per child on the same tokens (and for tiny-c one on as many
tokens as its making spent), grows each child's instruct (SFT -> online DPO) and reasoning (SFT ->
GRPO -> online DPO) variants on the built-in tasks, scores every checkpoint at 128 and 512 tokens
of context and on held-out task accuracy, then checks the family report: its structure, every
child beating its equal-tokens control, the first child recovering most of the loss its pruning
cost, GRPO raising held-out accuracy over its SFT checkpoint. Then a second run must find every
stage up to date.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd: Path, timeout: int = 2700) -> subprocess.CompletedProcess:
    """The limit only stops a hang: on a loaded 2-core machine the family run took 12 minutes (CI allows 90)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # use every core here
    return subprocess.run([sys.executable, "-m", "cascadec", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Run the small family once; yield (workdir, report.json, first run's stdout)."""
    root = tmp_path_factory.mktemp("family")
    spec = yaml.safe_load((ROOT / "specs" / "tiny.yaml").read_text())
    spec["budget"]["tokens"] = "1.2M"  # 600K bootstrap, 144K + 36K distillation per child
    spec["eval"]["tokens"] = "16K"
    (root / "small.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    done = _cli("run", "small.yaml", "--workdir", "ws", cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((root / "ws" / "stages" / "report" / "tiny" / "report.json").read_text())
    return root, report, done.stdout


def _stage_count(root: Path) -> int:
    plan = _cli("plan", "small.yaml", "--format", "json", cwd=root, timeout=120)
    assert plan.returncode == 0, plan.stderr
    return len(json.loads(plan.stdout)["stages"])


GRPO_MARGIN = 0.03  # held-out pass@1, mean of the three children: measured +0.039 here (0.062 -> 0.101), +0.050 in the full family
VARIANT_STEPS = [("parent", "parent"), ("base", "long"), ("instruct", "sft"), ("instruct", "odpo"),
                 ("reasoning", "sft"), ("reasoning", "grpo"), ("reasoning", "odpo")]


@pytest.mark.slow
def test_every_stage_ran_and_the_report_is_where_the_run_says(family):
    root, report, out = family
    assert f"{_stage_count(root)} run, 0 up to date." in out
    assert out.rstrip().endswith("report: ws/stages/report/tiny/report.md")
    folder = root / "ws" / "stages" / "report" / "tiny"
    md = (folder / "report.md").read_text()
    assert "| child | params | distill tokens | held-out loss |" in md and "```mermaid" in md
    assert "| prune stage | methods | KL to source | calibration loss before → after | top-1 agreement |" in md
    assert "## Post-training: instruct and reasoning variants" in md
    for png in ("loss_curves.png", "family.png", "benchmarks.png", "reward_curves.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| checkpoint | held-out loss | cascadec_perplexity_stdlib_heldout (bits_per_byte) | " \
           "cascadec_next_line_stdlib_heldout (acc_norm) |" in md
    assert "\r" not in out  # no progress-bar refreshes in a log (stdout is a pipe here)


@pytest.mark.slow
def test_harness_scores_every_checkpoint_and_exports_carry_a_model_card(family):
    root, report, _ = family
    assert set(report["benchmarks"]) == set(report["losses"])
    for name, row in report["benchmarks"].items():
        assert row["cascadec_perplexity_stdlib_heldout"]["metric"] == "bits_per_byte"
        assert 0 < row["cascadec_perplexity_stdlib_heldout"]["value"] < 8, name
        assert 0 <= row["cascadec_next_line_stdlib_heldout"]["value"] <= 1, name
    # the harness and our held-out loss agree on the order of the parent and the first child's final model
    bpb = {n: r["cascadec_perplexity_stdlib_heldout"]["value"] for n, r in report["benchmarks"].items()}
    assert (bpb["parent"] < bpb["tiny-a/long"]) == (report["losses"]["parent"] < report["losses"]["tiny-a/long"])
    card = (root / "ws" / "stages" / "export" / "tiny-a" / "long" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "## How it was made" in card
    assert "| tiny-a/long (this model) |" in card


@pytest.mark.slow
def test_every_checkpoint_states_the_context_it_was_trained_for(family):
    root, _, _ = family
    spec = yaml.safe_load((root / "small.yaml").read_text())
    want = {"bootstrap/parent": spec["models"]["parent"]["source"]["bootstrap"]["seq_len"]}
    for c in ("tiny-a", "tiny-b", "tiny-c"):
        want[f"control/{c}/equal-tokens"] = 128
        want[f"distill/{c}/short"] = 128
        want[f"distill/{c}/long"] = 512
    want["control/tiny-c/compute-matched"] = 128
    for sid, n in want.items():
        config = json.loads((root / "ws" / "stages" / sid / "model" / "config.json").read_text())
        assert config["max_position_embeddings"] == n, sid


@pytest.mark.slow
def test_report_structure(family):
    root, report, _ = family
    assert report["family"] == "tiny"
    assert [c["child"] for c in report["children"]] == ["tiny-a", "tiny-b", "tiny-c"]
    for c in report["children"]:
        for key in ("params", "tokens", "loss", "loss_short", "parent_loss", "pruned_loss", "control_loss"):
            assert isinstance(c[key], (int, float)), (c["child"], key)
        assert c["root"] == "parent" and c["tokens"] > 0
    # every stage of the plan is accounted for, with the tokens it was planned to see
    assert len(report["stages"]) == _stage_count(root)
    # written by the report stage itself, which is not finished while it writes
    assert [s["stage"] for s in report["stages"] if not s["done"]] == ["report/tiny"]
    for s in report["stages"]:
        if s["kind"] in ("bootstrap", "distill", "control"):
            assert s["tokens"] == s["planned_tokens"], s["stage"]
    # each prune measured its output against the checkpoint it was cut from (reconstruction.py)
    assert [r["stage"] for r in report["pruning"]] == [f"prune/tiny-{c}" for c in "abc"]
    for r in report["pruning"]:
        assert r["tokens"] > 0 and r["kl"] > 0 and r["loss"] > r["source_loss"] and 0 < r["top1_agreement"] < 1, r
    assert set(report["curves"]) == {"bootstrap/parent", *(f"control/tiny-{c}/equal-tokens" for c in "abc"),
                                      "control/tiny-c/compute-matched",
                                      *(f"distill/tiny-{c}/{p}" for c in "abc" for p in ("short", "long")),
                                      *(f"{k}/tiny-{c}/{v}/{k}" for c in "abc" for v, k in VARIANT_STEPS[2:])}


@pytest.mark.slow
def test_distillation_beats_the_from_scratch_control_and_recovers_the_first_prune(family):
    _, report, _ = family
    by = {c["child"]: c for c in report["children"]}
    for c in by.values():
        assert c["loss"] < c["control_loss"], c  # same shape, same tokens, random init loses
        assert c["beats_control"] is True
        assert c["pruned_loss"] > c["parent_loss"]  # pruning costs something ...
    first = by["tiny-a"]
    assert first["gap_recovered"] > 0.5, first  # ... and distillation wins most of it back
    # the compute-matched control: 292 + 3 x 70 + 17 steps of 2,048 tokens (bootstrap, the short phases
    # tiny-c descends from, its long phase); its loss is reported whatever it shows
    assert by["tiny-c"]["matched_tokens"] == 1_062_912 and isinstance(by["tiny-c"]["matched_loss"], float)
    assert by["tiny-c"]["beats_matched"] == (by["tiny-c"]["loss"] < by["tiny-c"]["matched_loss"])
    assert by["tiny-a"]["matched_loss"] is None


@pytest.mark.slow
def test_every_checkpoint_is_scored_at_short_and_long_context(family):
    root, report, _ = family
    assert set(report["contexts"]) == set(report["losses"])
    for name, row in report["contexts"].items():
        assert set(row) == {"128", "512"} and row["128"]["loss"] == report["losses"][name], name
        # 16K = 16,000 held-out tokens, rounded down to 15,872 (a multiple of 512): 31 and 124 sequences
        assert row["512"]["tokens"] == 31 * 511 and row["128"]["tokens"] == 124 * 127
        # only the long phases trained at 512 (and the variants grown from them): every other
        # checkpoint is marked at 512, none at 128
        grown = name.endswith("/long") or "/instruct/" in name or "/reasoning/" in name
        assert row["512"]["beyond_trained"] == (not grown), name
        assert row["128"]["beyond_trained"] is False
    md = (root / "ws" / "stages" / "report" / "tiny" / "report.md").read_text()
    assert "| checkpoint | 128 tokens | 512 tokens |" in md


@pytest.mark.slow
def test_second_run_is_all_up_to_date_and_report_json_matches(family):
    root, report, _ = family
    again = _cli("run", "small.yaml", "--workdir", "ws", cwd=root, timeout=120)
    assert again.returncode == 0 and f"0 run, {_stage_count(root)} up to date." in again.stdout
    shown = _cli("report", "small.yaml", "--workdir", "ws", "--format", "json", cwd=root, timeout=120)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["children"] == report["children"]


@pytest.mark.slow
def test_report_shows_every_variant_row_with_task_accuracy(family):
    _, report, _ = family
    assert report["accuracy_task"] == "cascadec_tasks_tasks_heldout"
    for child in ("tiny-a", "tiny-b", "tiny-c"):
        rows = [r for r in report["variants"] if r["child"] == child]
        assert [(r["variant"], r["step"]) for r in rows] == VARIANT_STEPS, child
        for r in rows:
            m = r["accuracy"]
            assert m["prompts"] == 150 and {"expr/accuracy", "sort/accuracy", "function/accuracy"} <= set(m) \
                and "reverse/accuracy" not in m, (child, r["step"])
            assert 0 <= m["accuracy"] <= 1 and 0 <= m["pass@1"] <= m["pass@4"] <= 1 and m["length"] > 0
        odpo = [r for r in rows if r["kind"] == "odpo"]
        assert all(0 <= r["win_rate"] <= 1 and r["win_rate_start"] is not None for r in odpo), odpo
        grpo = next(r for r in rows if r["kind"] == "grpo")
        assert isinstance(grpo["reward_start"], float) and isinstance(grpo["reward_end"], float)
    assert set(report["reward_curves"]) == {f"grpo/tiny-{c}/reasoning/grpo" for c in "abc"}


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_over_its_sft_checkpoint(family):
    """The reasoning SFT learned from a teacher that stops before its final answer 40% of the time
    (`unfinished: 0.4`); GRPO's format gate and answer rewards undo that. Asserted on pass@1, the
    accuracy of sampled answers (what GRPO optimises: the policy it samples), over the three
    children's 450 held-out problems; fixed seeds. Greedy accuracy is reported, not asserted: at
    this scale 16 steps can cost it a little (README, "What the embedded default shows")."""
    _, report, _ = family
    acc = {(r["child"], r["step"]): r["accuracy"] for r in report["variants"] if r["variant"] == "reasoning"}
    children = ("tiny-a", "tiny-b", "tiny-c")
    sft = sum(acc[(c, "sft")]["pass@1"] for c in children) / 3
    grpo = sum(acc[(c, "grpo")]["pass@1"] for c in children) / 3
    assert grpo >= sft + GRPO_MARGIN, {c: (acc[(c, "sft")]["pass@1"], acc[(c, "grpo")]["pass@1"]) for c in children}
