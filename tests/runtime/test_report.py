"""The family report over the tiny plan: both controls side by side and one held-out loss column
per eval context, from eval.json files written here (no training)."""

from __future__ import annotations

import json

from compilerkit import cascadec

from cascadec.runtime import report


def _plan() -> dict:
    run = cascadec("plan", "specs/tiny.yaml", "--format", "json")
    assert run.code == 0, run.err
    return json.loads(run.out)


def _write(ws, sid: str, checkpoints: dict) -> None:
    (ws / "stages" / sid).mkdir(parents=True, exist_ok=True)
    (ws / "stages" / sid / "eval.json").write_text(json.dumps({"checkpoints": checkpoints}))


def _score(short: float, long: float, trained: int) -> dict:
    return {"loss": short, "trained_context": trained, "contexts": {
        "128": {"loss": short, "beyond_trained": False}, "512": {"loss": long, "beyond_trained": trained < 512}}}


def test_report_shows_both_controls_and_a_column_per_context(tmp_path):
    plan = _plan()
    ws = tmp_path / "ws"
    _write(ws, "eval/parent", {"parent": _score(3.9, 4.5, 128)})
    _write(ws, "eval/tiny-c", {
        "tiny-c/pruned": _score(7.0, 7.25, 128), "tiny-c/short": _score(4.375, 4.75, 128),
        "tiny-c/long": _score(4.5, 4.25, 512), "tiny-c/control/equal-tokens": _score(5.0, 5.5, 128),
        "tiny-c/control/compute-matched": _score(4.125, 4.625, 128)})
    data = report.collect(plan, ws)
    c = next(r for r in data["children"] if r["child"] == "tiny-c")
    assert (c["loss"], c["control_loss"], c["matched_loss"], c["matched_tokens"]) == (4.5, 5.0, 4.125, 2_662_400)
    assert (c["beats_control"], c["beats_matched"]) == (True, False)  # reported whatever it shows
    a = next(r for r in data["children"] if r["child"] == "tiny-a")
    assert (a["matched_loss"], a["matched_tokens"], a["beats_matched"]) == (None, None, None)
    md = report.markdown(data, plan, [])
    assert ("| tiny-c | 236,080 | 446.46K | 4.5000 | 4.3750 | 3.9000 | 7.0000 | 5.0000 | yes | 4.1250 (2.66M) | **no** | "
            "81% |") in md
    assert "| control, equal tokens | beats it | control, compute-matched (tokens) | beats it |" in md
    assert "\n".join(["## Held-out loss by context length", "",
                      "| checkpoint | 128 tokens | 512 tokens |", "| --- | ---: | ---: |",
                      "| parent | 3.9000 | 4.5000 † |",
                      "| tiny-c/pruned | 7.0000 | 7.2500 † |",
                      "| tiny-c/short | 4.3750 | 4.7500 † |",
                      "| tiny-c/long | 4.5000 | 4.2500 |",
                      "| tiny-c/control/equal-tokens | 5.0000 | 5.5000 † |",
                      "| tiny-c/control/compute-matched | 4.1250 | 4.6250 † |"]) in md
