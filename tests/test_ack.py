"""Acknowledged warnings (`# cascadec: ack CODE`): where a comment sits decides what it covers,
errors cannot be acknowledged, and an acknowledgement that covers nothing is a warning (CSC008).

The specimen is specs/ministral3.yaml, whose 8B -> 3B step removes 60% of the parameters
(CSC220) as the paper did, acknowledged on the `shape:` line of the 3B child; its four stages that
cannot fit an 80 GB device with this runtime (CSC242) are acknowledged on their `seq_len:` lines, and its
three 262K phases taught by the 128K parent (CSC233) on their `teacher:` lines.
"""

from __future__ import annotations

import pytest
from compilerkit import REPO, cascadec

SPEC = (REPO / "specs" / "ministral3.yaml").read_text()
SHAPE = "    shape: {layers: 26, hidden: 3072, ffn: 9216, tied_embeddings: true}"
ACKED = SHAPE + "  # cascadec: ack CSC220 -- the paper's 8B -> 3B step\n"
LINE = SPEC[: SPEC.index(ACKED)].count("\n") + 1  # the line of the 3B child's shape


def validate(tmp_path, text):
    (tmp_path / "spec.yaml").write_text(text)
    return cascadec("validate", "spec.yaml", cwd=tmp_path)


def test_the_example_acknowledges_its_one_step_60_percent_cut(tmp_path):
    run = validate(tmp_path, SPEC)
    assert (run.code, run.err) == (0, "")
    assert run.out == "ok: spec.yaml: family 'ministral3', 45 stages, 8 warnings acknowledged\n"


def test_without_the_comment_the_warning_shows(tmp_path):
    run = validate(tmp_path, SPEC.replace(ACKED, SHAPE + "\n"))
    assert run.code == 0
    assert run.err.startswith(f"spec.yaml:{LINE}:12: warning[CSC220]: child 'ministral-3-3b' removes 60% of the parameters")
    assert run.out == "ok: spec.yaml: family 'ministral3', 45 stages, 7 warnings acknowledged\n"


@pytest.mark.parametrize("where", ["line above", "file header", "two codes"])
def test_a_comment_line_above_or_in_the_header_covers_the_warning(tmp_path, where):
    if where == "line above":
        text = SPEC.replace(ACKED, "    # cascadec: ack CSC220 -- the paper's 8B -> 3B step\n" + SHAPE + "\n")
    elif where == "file header":
        text = "# cascadec: ack CSC220 -- every step of this family is the paper's\n" + SPEC.replace(ACKED, SHAPE + "\n")
    else:
        text = SPEC.replace("ack CSC220 --", "ack CSC214, CSC220 --")
    run = validate(tmp_path, text)
    assert run.out.endswith("8 warnings acknowledged\n")
    assert "warning[CSC220]" not in run.err
    if where == "two codes":  # CSC214 covers nothing on that line
        assert run.err.startswith(f"spec.yaml:{LINE}:90: warning[CSC008]: `ack CSC214` acknowledges no warning: "
                                  f"there is no CSC214 warning on line {LINE}\n")
    else:
        assert run.err == ""


def test_an_acknowledgement_that_covers_nothing_is_a_warning(tmp_path):
    text = SPEC.replace("    prune_from: ministral-3-8b/short\n",
                        "    prune_from: ministral-3-8b/short  # cascadec: ack CSC220\n")
    text = text.replace(ACKED, SHAPE + "\n")
    run = validate(tmp_path, text)
    assert run.code == 0
    assert f"spec.yaml:{LINE - 1}:55: warning[CSC008]: `ack CSC220` acknowledges no warning: there is no CSC220 " \
           f"warning on line {LINE - 1}\n" in run.err
    assert "  = help: remove the acknowledgement (the spec changed), or move it onto the line the warning points at" in run.err
    assert f"spec.yaml:{LINE}:12: warning[CSC220]" in run.err  # and the warning it missed still shows
    assert run.err.endswith("\n2 warnings\n")


def test_errors_cannot_be_acknowledged(tmp_path):
    text = SPEC.replace(ACKED, "    shape: {layers: 99, hidden: 3072, ffn: 9216}  # cascadec: ack CSC207\n")
    run = validate(tmp_path, text)
    assert run.code == 1
    assert f"spec.yaml:{LINE}:21: error[CSC207]: child 'ministral-3-3b' grows layers from 34 to 99" in run.err
    assert "warning[CSC008]: `ack CSC207` acknowledges no warning" in run.err


def test_plan_and_graph_stay_quiet_too(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    for command in (["plan", "spec.yaml"], ["graph", "spec.yaml"]):
        run = cascadec(*command, cwd=tmp_path)
        assert (run.code, run.err) == (0, ""), command
