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


def _accuracy(acc: float, k: float, length: float, loops: float, **per_task: float) -> dict:
    row = {"accuracy": acc, "pass@1": acc / 2, "pass@4": k, "length": length, "loop_rate": loops}
    return {"cascadec_tasks_tasks_heldout": {**row, **{f"{t}/accuracy": v for t, v in per_task.items()}}}


def test_report_shows_every_variant_step_with_accuracy_win_rate_and_reward(tmp_path):
    plan = _plan()
    ws = tmp_path / "ws"
    steps = {s["id"] for s in plan["stages"] if s["kind"] in report.POST_TRAINING and s["id"].split("/")[1] == "tiny-c"}
    assert steps == {"sft/tiny-c/instruct/sft", "odpo/tiny-c/instruct/odpo", "sft/tiny-c/reasoning/sft",
                     "grpo/tiny-c/reasoning/grpo", "odpo/tiny-c/reasoning/odpo"}
    _write(ws, "eval/parent", {"parent": {**_score(3.9, 4.5, 128), "harness": _accuracy(0.0, 0.0, 64.0, 0.5)}})
    _write(ws, "eval/tiny-c", {
        "tiny-c/long": {**_score(4.5, 4.25, 512), "harness": _accuracy(0.01, 0.02, 64.0, 0.25, expr=0.0, sort=0.04)},
        "tiny-c/instruct/sft": {**_score(4.6, 4.3, 512), "harness": _accuracy(0.25, 0.5, 20.0, 0.0, expr=0.1, sort=0.4)},
        "tiny-c/reasoning/sft": {**_score(4.6, 4.3, 512), "harness": _accuracy(0.25, 0.5, 30.0, 0.0)},
        "tiny-c/reasoning/grpo": {**_score(4.7, 4.4, 512), "harness": _accuracy(0.5, 0.75, 28.5, 0.0)}})
    odpo = ws / "stages" / "odpo/tiny-c/instruct/odpo"
    odpo.mkdir(parents=True)
    (odpo / "manifest.json").write_text(json.dumps({"metrics": {"win_rate_start": 0.5, "win_rate": 0.625}}))
    (odpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "win_rate": 0.5}, {"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6, "win_rate": 0.625}]))
    grpo = ws / "stages" / "grpo/tiny-c/reasoning/grpo"
    grpo.mkdir(parents=True)
    (grpo / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward_mean": r}) + "\n"
                                                for i, r in enumerate([0.25, 0.5, 0.5, 0.75, 0.75], 1)))
    data = report.collect(plan, ws)
    rows = [r for r in data["variants"] if r["child"] == "tiny-c"]
    assert [(r["variant"], r["step"]) for r in rows] == [
        ("parent", "parent"), ("base", "long"), ("instruct", "sft"), ("instruct", "odpo"), ("reasoning", "sft"),
        ("reasoning", "grpo"), ("reasoning", "odpo")]
    assert data["accuracy_task"] == "cascadec_tasks_tasks_heldout"
    assert data["reward_curves"] == {"grpo/tiny-c/reasoning/grpo": [[1, 0.25], [2, 0.5], [3, 0.5], [4, 0.75], [5, 0.75]]} \
        or data["reward_curves"] == {"grpo/tiny-c/reasoning/grpo": [(1, 0.25), (2, 0.5), (3, 0.5), (4, 0.75), (5, 0.75)]}
    assert data["win_rate_curves"] == {"odpo/tiny-c/instruct/odpo": [(0, 0.5), (2, 0.625)]}
    md = report.markdown(data, plan, ["reward_curves.png"])
    assert "| child | variant | step | accuracy (greedy) | pass@4 | pass@1 | mean length | loop rate | judge win rate | " \
           "reward |" in md
    assert "| tiny-c | parent | parent | 0.00 | 0.00 | 0.00 | 64.0 | 0.50 | – | – |" in md
    assert "| tiny-c | base | long | 0.01 | 0.02 | 0.01 | 64.0 | 0.25 | – | – |" in md
    assert "| tiny-c | instruct | odpo | – | – | – | – | – | 0.50 → 0.62 | – |" in md  # not scored: shown as such
    assert "| tiny-c | reasoning | grpo | 0.50 | 0.75 | 0.25 | 28.5 | 0.00 | – | 0.250 → 0.750 |" in md
    assert "| child | variant | step | expr | sort |" in md and "| tiny-c | instruct | sft | 0.10 | 0.40 |" in md
    assert "![reward curves](reward_curves.png)" in md
    images = report.plots(data, tmp_path)
    assert "reward_curves.png" in images and (tmp_path / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"
