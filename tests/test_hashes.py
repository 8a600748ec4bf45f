"""Merkle hashes and `cascadec diff`: one changed knob changes exactly the hashes of its stage and
that stage's descendants, and `diff` says so in words.

The edits work on copies of specs/ministral3.yaml in tmp_path. That spec shares its pretraining
phases between the 14B and the 8B through a YAML anchor (`phases: &pretrain` / `*pretrain`), so
an edit meant for the 8B alone writes the 8B's phases out instead of touching the anchor.
"""

from __future__ import annotations

import json
import shutil

import networkx as nx
import pytest
from compilerkit import REPO, cascadec

SPEC = REPO / "specs" / "ministral3.yaml"
ALIAS_8B = "    phases: *pretrain\n    variants: *variants\n"
PHASES_8B = """    phases:
      - name: short
        teacher: mistral-small-3.1
        data: pretrain
        tokens: {assumed: 30%, why: "Fig. 2 read as 0.3/0.3/0.4 of the single pass"}
        seq_len: 16384
        optimizer: {lr: 5.0e-5}
      - name: long
        teacher: mistral-small-3.1
        data: long-context
        tokens: {assumed: 20B, why: "long-context token count not given"}
        seq_len: 262144
        batch: {global: {assumed: 16, why: "not given; 16 x 262,144 = 4.2M tokens per step"}}
        resources: {devices: 16, nodes: 2}   # one 262K-token sequence per device (no context parallelism)
        rope: {rope_type: yarn, factor: 16.0, original_max_position_embeddings: 16384, rope_theta: 1000000.0, beta_fast: 32.0, beta_slow: 1.0, mscale: 1.0, mscale_all_dim: 1.0, llama_4_scaling_beta: 0.1}
        max_position_embeddings: 262144
    variants: *variants
"""


def _plan(path) -> dict:
    run = cascadec("plan", str(path), "--format", "json", cwd=path.parent)
    assert run.code == 0, run.err
    return json.loads(run.out)


def _needs_graph(plan: dict) -> nx.DiGraph:
    g = nx.DiGraph()
    for s in plan["stages"]:
        g.add_node(s["id"])
        g.add_edges_from((n, s["id"]) for n in s["needs"])
    return g


def _changed(old: dict, new: dict) -> set:
    a = {s["id"]: s["hash"] for s in old["stages"]}
    b = {s["id"]: s["hash"] for s in new["stages"]}
    assert a.keys() == b.keys()
    return {sid for sid in a if a[sid] != b[sid]}


@pytest.fixture
def family(tmp_path):
    """(original spec, its saved plan) in tmp_path, and a function that writes an edited copy."""
    spec = tmp_path / "ministral3.yaml"
    shutil.copy(SPEC, spec)
    run = cascadec("plan", "ministral3.yaml", "-o", "plan.json", cwd=tmp_path)
    assert run.code == 0, run.err

    def edited(old: str, new: str) -> "object":
        text = SPEC.read_text()
        assert text.count(old) == 1, old
        out = tmp_path / "edited" / "ministral3.yaml"
        out.parent.mkdir(exist_ok=True)
        out.write_text(text.replace(old, new))
        return out

    return spec, tmp_path / "plan.json", edited


EDITS = {
    # the 8B's short-phase LR: its distill stage, then everything cut from or trained after it
    "8b-short-lr": (ALIAS_8B, PHASES_8B, {"distill/ministral-3-8b/short"}),
    # the 8B's defaults: every 8B training stage changes on its own (calibration has no optimizer)
    "8b-defaults": (ALIAS_8B, "    defaults: {optimizer: {weight_decay: 0.05}}\n" + ALIAS_8B, None),
    # a leaf knob: the 3B reasoning GRPO's clip (the 14B's line carries a comment, so this one is unique)
    "3b-grpo-clip": ("          seq_len: 81920\n          rewards: [format, math, code, length]\n          clip: {low: 0.2, high: 0.28}\n",
                     "          seq_len: 81920\n          rewards: [format, math, code, length]\n          clip: {low: 0.2, high: 0.3}\n",
                     {"grpo/ministral-3-3b/reasoning/grpo-stem"}),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_one_knob_changes_exactly_its_stage_and_descendants(family, name):
    spec, _, edited = family
    old_text, new_text, roots = EDITS[name]
    old, new = _plan(spec), _plan(edited(old_text, new_text))
    g = _needs_graph(old)
    if roots is None:  # the stages whose own config changed
        a = {s["id"]: s for s in old["stages"]}
        roots = {s["id"] for s in new["stages"] if s["config"] != a[s["id"]]["config"]}
        assert roots == {s["id"] for s in new["stages"]
                         if s["kind"] in ("distill", "sft", "odpo", "grpo") and "/ministral-3-8b/" in s["id"]}
    expected = set(roots).union(*(nx.descendants(g, r) for r in roots))
    assert _changed(old, new) == expected
    # and the plans differ nowhere else: same stages, same models except where a shape moved
    assert old["models"] == new["models"]
    assert [s["id"] for s in old["stages"]] == [s["id"] for s in new["stages"]]


def test_the_8b_short_lr_reaches_the_3b_but_not_the_14b(family):
    spec, _, edited = family
    old, new = _plan(spec), _plan(edited(ALIAS_8B, PHASES_8B))
    changed = _changed(old, new)
    assert "prune/ministral-3-3b" in changed and "distill/ministral-3-3b/short" in changed
    assert not any("ministral-3-14b" in sid for sid in changed)
    assert "teacher-logits/mistral-medium-3/sft-instruct" not in changed
    assert "eval/mistral-small-3.1" not in changed


def test_provenance_is_not_hashed(family):
    """Writing the default value out changes provenance only: no hash moves."""
    spec, _, edited = family
    old = _plan(spec)
    new = _plan(edited("  checkpoint: {every_steps: 500, keep: 3}\n",
                       "  checkpoint: {every_steps: 500, keep: 3}\n  seed: 0\n"))
    assert _changed(old, new) == set()
    a = {s["id"]: s for s in old["stages"]}
    moved = [s["id"] for s in new["stages"] if s["provenance"] != a[s["id"]]["provenance"]]
    assert moved and all(a[sid]["provenance"].get("config.seed") == "default" for sid in moved)


def test_diff_explains_a_change_in_words(family):
    spec, plan, edited = family
    new = edited(ALIAS_8B, PHASES_8B)
    run = cascadec("diff", str(plan), str(new))
    assert run.code == 1, run.err
    lines = run.out.splitlines()
    assert "~ distill/ministral-3-8b/short (distill): changed" in lines
    assert "    config.optimizer.lr: 0.0001 -> 5e-05" in lines
    assert "! distill/ministral-3-8b/long (distill): invalidated by distill/ministral-3-8b/short" in lines
    assert "! prune/ministral-3-3b (prune): invalidated by distill/ministral-3-8b/short" in lines
    assert "! report/ministral3 (report): invalidated by eval/ministral-3-3b, eval/ministral-3-8b" in lines \
        or any(line.startswith("! report/ministral3 (report): invalidated by") for line in lines)
    # every changed stage is named once, either as changed or as invalidated
    changed = _changed(_plan(spec), _plan(new))
    named = {line.split()[1] for line in lines if line[:2] in ("~ ", "! ")}
    assert named == changed
    assert not any("ministral-3-14b" in line for line in lines)


def test_diff_of_a_changed_provenance_only_is_equal(family):
    spec, plan, edited = family
    new = edited("  checkpoint: {every_steps: 500, keep: 3}\n", "  checkpoint: {every_steps: 500, keep: 3}\n  seed: 0\n")
    run = cascadec("diff", str(plan), str(new))
    assert "config.seed" not in run.out and "~ " not in run.out


def test_diff_of_equal_plans_exits_0(family):
    spec, plan, _ = family
    for old, new in ((plan, plan), (spec, spec), (plan, spec)):  # a saved plan against its own spec, too
        run = cascadec("diff", str(old), str(new))
        assert (run.code, run.out) == (0, "plans are equal\n"), run.err


def test_diff_of_a_saved_plan_whose_spec_moved_on(family):
    """The saved plan is compared as saved: editing the spec beside it shows up as a change."""
    spec, plan, edited = family
    spec.write_text(edited(ALIAS_8B, PHASES_8B).read_text())
    run = cascadec("diff", str(plan), str(spec))
    assert run.code == 1, run.err
    assert "~ distill/ministral-3-8b/short (distill): changed" in run.out.splitlines()


def test_diff_cannot_compare_a_missing_file(family, tmp_path):
    spec, _, _ = family
    run = cascadec("diff", str(tmp_path / "nope.json"), str(spec))
    assert run.code == 2 and "no such plan file" in run.err


def test_teacher_logits_temperatures_are_in_the_plan(tmp_path):
    """The cache stores the rest mass at its readers' temperatures, so they are in its config
    (hashed): distilling at τ = 2 reruns the cache, not only the stages that read it."""
    text = (REPO / "specs" / "cookbook" / "qwen3.yaml").read_text()
    old_line, new_line = "loss: {top_k: 64}  ", "loss: {top_k: 64, temperature: 2.0}  "
    assert text.count(old_line) == 1
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "qwen3.yaml").write_text(text)
    (tmp_path / "b" / "qwen3.yaml").write_text(text.replace(old_line, new_line))
    old, new = _plan(tmp_path / "a" / "qwen3.yaml"), _plan(tmp_path / "b" / "qwen3.yaml")
    cache = "teacher-logits/qwen3-32b/chat"
    configs = {p: next(s["config"] for s in plan["stages"] if s["id"] == cache) for p, plan in (("old", old), ("new", new))}
    assert configs["old"]["temperatures"] == [1.0] and configs["new"]["temperatures"] == [2.0]
    assert {k for k in configs["old"] if configs["old"][k] != configs["new"][k]} == {"temperatures"}
    g = _needs_graph(old)
    readers = {"sft/qwen3-4b/instruct/sft", "sft/qwen3-1.7b/instruct/sft"}
    assert set(g.successors(cache)) == readers
    assert _changed(old, new) == {cache}.union(*(nx.descendants(g, r) for r in {cache, *readers}))
