"""`cascadec diff` as users read it: a one-line summary first, the spec lines that changed,
counts in the plan's units with their deltas, each changed stage's cost change. Snapshots live
in tests/golden/cli/diff.*.txt (rewritten only by `pytest --update-goldens`).
"""

from __future__ import annotations

import shutil

import pytest
from compilerkit import GOLDEN, REPO, cascadec, check_golden

from cascadec.diff import _arrow, _count, spec_changes

TINY = (REPO / "specs" / "tiny.yaml").read_text()
EDITS = {  # name -> (spec edit, what the summary must say)
    "tokens": ((("tokens: 12%", "tokens: 15%"),),
               "Plan: 13 stages changed, 23 invalidated downstream, 0 added, 0 removed; 36 of 44 stages would rerun "
               "(1.02 of 1.31 device-hours)."),
    "control-off": ((("    pruning: {hidden: pca, ffn: activation, heads: query}\n    control: [equal-tokens, compute-matched]",
                      "    pruning: {hidden: pca, ffn: activation, heads: query}\n    control: equal-tokens"),),
                    "Plan: 1 stage changed, 2 invalidated downstream, 0 added, 1 removed; 3 of 43 stages would rerun "
                    "(0.01 of 1.12 device-hours)."),
}


@pytest.fixture
def specs(tmp_path):
    shutil.copy(REPO / "specs" / "tiny.yaml", tmp_path / "old.yaml")
    return tmp_path


@pytest.mark.parametrize("name", sorted(EDITS))
def test_diff_of_two_specs_is_pinned(specs, name, update_goldens):
    text = TINY
    for a, b in EDITS[name][0]:
        assert a in text
        text = text.replace(a, b)
    (specs / "new.yaml").write_text(text)
    run = cascadec("diff", "old.yaml", "new.yaml", cwd=specs)
    assert run.code == 1, run.err
    assert run.out.splitlines()[0] == EDITS[name][1]
    check_golden(GOLDEN / "cli" / f"diff.{name}.txt", run.out, update_goldens)


def test_diff_of_saved_plans_has_no_spec_lines_but_the_same_summary(specs):
    (specs / "new.yaml").write_text(TINY.replace("tokens: 12%", "tokens: 15%"))
    for spec in ("old", "new"):
        assert cascadec("plan", f"{spec}.yaml", "-o", f"{spec}.json", cwd=specs).code == 0
    plans = cascadec("diff", "old.json", "new.json", cwd=specs)
    specs_run = cascadec("diff", "old.yaml", "new.yaml", cwd=specs)
    assert plans.code == 1
    assert plans.out.splitlines()[0] == specs_run.out.splitlines()[0]
    assert "spec lines changed:" not in plans.out and "spec lines changed:" in specs_run.out
    # everything after the spec lines is the same
    assert plans.out.split("\n\n", 1)[1] == specs_run.out.split("\n\n", 2)[2]


def test_counts_read_in_the_plan_units_with_deltas():
    assert _arrow(900_000_000_000, 1_050_000_000_000, _count) == "900.00B -> 1.05T (+150.00B)"
    assert _arrow(446_464, 358_400, _count) == "446.46K -> 358.40K (-88.06K)"
    # rounded forms that would read as equal are shown exactly
    assert _arrow(900_000_000_000, 900_001_000_000, _count) == "900,000,000,000 -> 900,001,000,000 (+1,000,000)"
    # rates are shown as written, without float-noise deltas; whole numbers keep theirs
    assert _arrow(0.0001, 5e-05) == "0.0001 -> 5e-05"
    assert _arrow(16384, 32768) == "16384 -> 32768 (+16384)"
    assert _arrow("cosine", "linear") == '"cosine" -> "linear"'


def test_spec_changes_name_file_and_line():
    old = "a: 1\nb: 2\nc: 3\n"
    new = "a: 1\nb: 20\nc: 3\nd: 4\n"
    assert spec_changes("x.yaml", old, "y.yaml", new) == [
        "spec lines changed:",
        "  x.yaml:2: - b: 2",
        "  y.yaml:2: + b: 20",
        "  y.yaml:4: + d: 4",
    ]
    assert spec_changes("x.yaml", old, "y.yaml", old) == []
    many = spec_changes("x.yaml", "", "y.yaml", "".join(f"k{i}: {i}\n" for i in range(50)))
    assert len(many) == 42 and many[-1] == "  ... and 10 more changed lines"
