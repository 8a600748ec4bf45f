"""Structural properties of plans, checked against the contract (DESIGN §4, docs/plan.md) with
arithmetic written out here rather than taken from the compiler.
"""

from __future__ import annotations

import heapq
import json

import pytest
from compilerkit import REPO, SPECS, plan_json, spec_id

PUBLISHED = {"mistral-small-3.1": 23_572_403_200, "ministral-3-14b": 13_506_073_600,
             "ministral-3-8b": 8_489_553_920, "ministral-3-3b": 3_429_006_336}
LAYERS = {"ministral-3-14b": 40, "ministral-3-8b": 34, "ministral-3-3b": 26}
TRAINING = ("bootstrap", "control", "distill", "sft", "dpo")


def _plan(name: str) -> dict:
    return json.loads(plan_json(REPO / "specs" / f"{name}.yaml", f"specs/{name}.yaml"))


@pytest.fixture(scope="module")
def plans() -> dict:
    return {spec_id(spec): _plan(spec_id(spec)) for spec in SPECS}


@pytest.fixture(scope="module")
def m3(plans) -> dict:
    return {s["id"]: s for s in plans["ministral3"]["stages"]}


def _kahn_smallest_first(stages: list[dict]) -> list[str]:
    """Topological order that always takes the smallest ready id (the documented tie-break)."""
    waiting = {s["id"]: set(s["needs"]) for s in stages}
    users: dict = {}
    for s in stages:
        for n in s["needs"]:
            users.setdefault(n, []).append(s["id"])
    ready = [sid for sid, needs in waiting.items() if not needs]
    heapq.heapify(ready)
    order = []
    while ready:
        sid = heapq.heappop(ready)
        order.append(sid)
        for u in users.get(sid, ()):
            waiting[u].discard(sid)
            if not waiting[u]:
                heapq.heappush(ready, u)
    return order


@pytest.mark.parametrize("name", [spec_id(s) for s in SPECS])
def test_stages_are_topological_with_ties_broken_by_id(plans, name):
    stages = plans[name]["stages"]
    ids = [s["id"] for s in stages]
    assert len(set(ids)) == len(ids)
    assert ids == _kahn_smallest_first(stages)


@pytest.mark.parametrize("name", [spec_id(s) for s in SPECS])
def test_needs_are_exactly_the_stage_inputs(plans, name):
    """`needs` is sorted and names every stage an input reads (and nothing else, except none)."""
    for s in plans[name]["stages"]:
        assert s["needs"] == sorted(s["needs"])
        assert {i["stage"] for i in s["inputs"] if "stage" in i} == set(s["needs"]), s["id"]
        for i in s["inputs"]:
            if "stage" in i:
                assert i["path"].startswith(f"stages/{i['stage']}/")
        for out in s["outputs"]:
            assert out.startswith(f"stages/{s['id']}/")


@pytest.mark.parametrize("name", [spec_id(s) for s in SPECS])
def test_tokens_are_steps_times_sequence_times_batch(plans, name):
    for s in plans[name]["stages"]:
        c = s["config"]
        if s["kind"] in TRAINING:
            assert c["tokens"] == c["steps"] * c["seq_len"] * c["global_batch"], s["id"]
            assert s["estimate"]["tokens"] == c["tokens"] and s["estimate"]["steps"] == c["steps"]
            assert c["steps"] > 0


def test_the_next_child_is_cut_from_the_short_context_checkpoint(m3):
    for child, parent in (("ministral-3-8b", "ministral-3-14b"), ("ministral-3-3b", "ministral-3-8b")):
        short = f"distill/{parent}/short"
        assert short in m3[f"prune/{child}"]["needs"]
        assert short in m3[f"calibrate/{child}"]["needs"]
        assert f"distill/{parent}/long" not in m3[f"prune/{child}"]["needs"]
        model = next(i for i in m3[f"prune/{child}"]["inputs"] if i["role"] == "model")
        assert model == {"role": "model", "stage": short, "path": f"stages/{short}/model"}
    first = next(i for i in m3["prune/ministral-3-14b"]["inputs"] if i["role"] == "model")
    assert first == {"role": "model", "model": "mistral-small-3.1"}


def test_teachers_are_inputs(m3):
    for sid, s in m3.items():
        if s["kind"] == "distill":
            assert {"role": "teacher", "model": "mistral-small-3.1"} in s["inputs"], sid
    assert {"role": "teacher", "model": "magistral-small-1.2"} in m3["sft/ministral-3-3b/reasoning/sft"]["inputs"]
    for size in ("14b", "8b", "3b"):
        odpo = m3[f"odpo/ministral-3-{size}/instruct/odpo"]
        assert {"role": "judge:pwrm", "model": "pwrm"} in odpo["inputs"]


def test_one_teacher_logits_cache_serves_the_three_instruct_sfts(m3):
    caches = [s for s in m3.values() if s["kind"] == "teacher-logits"]
    assert [c["id"] for c in caches] == ["teacher-logits/mistral-medium-3/sft-instruct"]
    cache = caches[0]
    users = [f"ministral-3-{size}/instruct/sft" for size in ("14b", "3b", "8b")]
    assert cache["config"]["users"] == users
    assert {"role": "teacher", "model": "mistral-medium-3"} in cache["inputs"]
    assert {"role": "tokens", "stage": "tokenize/sft-instruct/mistral-medium-3",
            "path": "stages/tokenize/sft-instruct/mistral-medium-3/tokens"} in cache["inputs"]
    assert cache["config"]["top_k"] == 128
    for user in users:
        sft = m3[f"sft/{user}"]
        assert {"role": "teacher_logits", "stage": cache["id"], "path": f"stages/{cache['id']}/logits"} in sft["inputs"]
        assert not any(i["role"] == "teacher" for i in sft["inputs"])  # reads the cache, not the teacher
        assert cache["id"] in sft["needs"]
        # the same window of the same data (the student may visit it in another order)
        assert {k: sft["config"]["data"][k] for k in ("name", "offset")} == cache["config"]["data"]
        assert sft["config"]["loss"]["teacher"] is True
        # the student pays only its own 3 passes of (2·N + attention); the teacher's forward is
        # paid once, by the cache
        n, d, s = PUBLISHED[user.split("/")[0]], sft["estimate"]["tokens"], sft["config"]["seq_len"]
        attention = 6 * LAYERS[user.split("/")[0]] * 32 * 128 * (s + 1) * d
        assert (sft["estimate"]["flops"], sft["estimate"]["attention_flops"]) == (6 * n * d + attention, attention)
    n_teacher = 88 * (12288 * 96 * 128 * 2 + 2 * 12288 * 8 * 128 + 3 * 12288 * 28672 + 2 * 12288) \
        + 2 * 131072 * 12288 + 12288  # Mistral Medium 3 as the spec writes it
    d, s = cache["config"]["tokens"], cache["config"]["seq_len"]
    assert cache["estimate"]["flops"] == 2 * n_teacher * d + 2 * 88 * 96 * 128 * (s + 1) * d


def test_distill_flops_are_6nd_plus_2_teacher_nd_plus_causal_attention(m3):
    for size in ("14b", "8b", "3b"):
        for phase in ("short", "long"):
            s = m3[f"distill/ministral-3-{size}/{phase}"]
            c = s["config"]
            d = c["steps"] * c["seq_len"] * c["global_batch"]
            n, n_teacher = PUBLISHED[f"ministral-3-{size}"], PUBLISHED["mistral-small-3.1"]
            # causal attention, forward, per token: 2·layers·(heads·head_dim)·(seq_len + 1); the
            # student trains (3 forward passes' worth), the 40-layer teacher runs one forward
            attention = (3 * 2 * LAYERS[f"ministral-3-{size}"] + 2 * 40) * 32 * 128 * (c["seq_len"] + 1) * d
            assert s["estimate"]["tokens"] == d
            assert s["estimate"]["flops"] == 6 * n * d + 2 * n_teacher * d + attention
            assert s["estimate"]["attention_flops"] == attention


def test_device_hours_follow_from_flops(plans):
    plan = plans["ministral3"]
    hw = plan["totals"]["hardware"]
    for s in plan["stages"]:
        e = s["estimate"]
        assert e["device_hours"] == pytest.approx(e["flops"] / (hw["peak_tflops"] * 1e12 * hw["mfu"]) / 3600,
                                                  rel=1e-3, abs=1e-4), s["id"]
    assert plan["totals"]["flops"] == sum(s["estimate"]["flops"] for s in plan["stages"])


def test_share_budgets_split_one_pass(plans, m3):
    """30% / 30% / 40% of 3T, rounded down to whole steps of 256 x 16,384 tokens."""
    per_step = 256 * 16384
    for size, share in (("14b", 0.3), ("8b", 0.3), ("3b", 0.4)):
        s = m3[f"distill/ministral-3-{size}/short"]
        assert s["config"]["steps"] == int(share * 3 * 10**12) // per_step
    # the streamed pretraining data is read in consecutive, non-overlapping windows
    windows = sorted((s["config"]["data"]["offset"], s["config"]["tokens"]) for s in m3.values()
                     if s["kind"] == "distill" and s["config"]["data"]["name"] == "pretrain")
    assert windows[0][0] == 0
    for (start, size), (nxt, _) in zip(windows, windows[1:]):
        assert nxt == start + size


def test_assumed_values_are_listed(plans):
    assumed = plans["ministral3"]["assumed"]
    assert any(a.startswith("budget.tokens: ") for a in assumed)
    assert all(": " in a for a in assumed)
    assert plans["minitron"]["assumed"]
    assert plans["tiny"]["assumed"] == ["hardware.peak_tflops: 2 laptop CPU cores in fp32",
                                        "hardware.mfu: tiny matrices use a CPU poorly"]
