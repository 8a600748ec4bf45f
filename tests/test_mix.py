"""Weighted mixes: the interleaving schedule (`cascadec/mix.py`) and the per-source windows the
plan gives every stage that reads a mix (exact counts, consecutive per source, one tokenize
stage per source shared by all readers)."""

from __future__ import annotations

import json
from fractions import Fraction

import yaml
from compilerkit import REPO, cascadec

from cascadec import mix

SEVENTY_THIRTY = {"web": 0.7, "code": 0.3}


def test_seventy_thirty_is_seven_and_three_in_every_ten_sequences_spread_out():
    assert mix.fractions(SEVENTY_THIRTY) == {"code": Fraction(3, 10), "web": Fraction(7, 10)}
    p, per, order, _ = mix.schedule(SEVENTY_THIRTY)
    assert (p, per) == (10, {"code": 3, "web": 7})
    assert "".join(s[0] for s in order) == "wcwwcwwwcw"  # never more than three web in a row
    assert mix.counts(SEVENTY_THIRTY, 1000) == {"code": 300, "web": 700}
    assert mix.counts(SEVENTY_THIRTY, 13) == {"code": 4, "web": 9}
    assert mix.counts({"a": 2, "b": 1, "c": 1}, 8) == {"a": 4, "b": 2, "c": 2}


def test_locate_numbers_each_sources_sequences_consecutively():
    seen = {"web": 0, "code": 0}
    for i in range(137):
        name, j = mix.locate(SEVENTY_THIRTY, i)
        assert j == seen[name]
        seen[name] += 1
        assert mix.counts(SEVENTY_THIRTY, i + 1) == seen


def _mix_plan(tmp_path) -> dict:
    spec = yaml.safe_load((REPO / "specs" / "tiny.yaml").read_text())
    spec["data"].update({"web": {"kind": "jsonl", "paths": ["web/*.jsonl"], "field": "text"},
                         "code": {"kind": "text", "paths": ["code/*.py"]},
                         "blend": {"kind": "mix", "mix": SEVENTY_THIRTY, "stream": True}})
    for child in spec["children"]:
        for phase in child.get("phases") or []:
            phase["data"] = "blend"
    spec["children"][1]["phases"] = spec["children"][0]["phases"]  # (anchors are lost by safe_dump)
    spec["children"][2]["phases"] = spec["children"][0]["phases"]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run = cascadec("plan", str(tmp_path / "mix.yaml"), "--format", "json")
    assert run.code == 0, run.err
    return json.loads(run.out)


def test_each_stage_gets_exact_per_source_windows_that_follow_each_other(tmp_path):
    plan = _mix_plan(tmp_path)
    readers = [s for s in plan["stages"] if s["kind"] == "distill"]
    assert len(readers) == 6
    ends = {"web": 0, "code": 0}
    for s in readers:
        cfg = s["config"]
        n = cfg["steps"] * cfg["global_batch"]
        sources = cfg["data"]["sources"]
        assert cfg["data"]["mix"] == SEVENTY_THIRTY
        assert {k: v["sequences"] for k, v in sources.items()} == mix.counts(SEVENTY_THIRTY, n)
        assert sum(v["tokens"] for v in sources.values()) == cfg["tokens"] == n * cfg["seq_len"]
        for name, w in sources.items():
            assert w["tokens"] == w["sequences"] * cfg["seq_len"]
            assert w["offset"] == ends[name]  # one pass per source: consecutive, no overlap
            ends[name] += w["tokens"]
        roles = sorted(i["role"] for i in s["inputs"] if i["role"].startswith("tokens"))
        assert roles == ["tokens:code", "tokens:web"]
    first = readers[0]["config"]["data"]["sources"]  # 175 steps x 16 = 2,800 sequences: 280 periods
    assert (first["web"]["sequences"], first["code"]["sequences"]) == (1960, 840)
    tokenize = sorted(s["id"] for s in plan["stages"] if s["kind"] == "tokenize")
    assert tokenize == ["tokenize/code/parent", "tokenize/stdlib-heldout/parent", "tokenize/tasks-sft-think/parent",
                        "tokenize/tasks-sft/parent", "tokenize/web/parent"]
    control = next(s for s in plan["stages"] if s["id"] == "control/tiny-a/equal-tokens")["config"]
    assert {k: v["offset"] for k, v in control["data"]["sources"].items()} == {"code": 0, "web": 0}
    assert sum(v["tokens"] for v in control["data"]["sources"].values()) == control["tokens"]
    # the compute-matched control re-reads each source of the mix from its start, by weight
    matched = next(s for s in plan["stages"] if s["id"] == "control/tiny-c/compute-matched")["config"]
    assert matched["data"]["mix"] == SEVENTY_THIRTY and matched["data"]["offset"] == 0
    assert {k: (v["offset"], v["sequences"]) for k, v in matched["data"]["sources"].items()} == {
        k: (0, n) for k, n in mix.counts(SEVENTY_THIRTY, matched["steps"] * matched["global_batch"]).items()}
    assert sum(v["tokens"] for v in matched["data"]["sources"].values()) == matched["tokens"]
