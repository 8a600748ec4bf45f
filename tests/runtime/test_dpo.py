"""The offline dpo stage on a toy preference set: the loss falls from log(2)/β, the reference
log-probs are the starting model's and are computed once, resume is exact, the model loads."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cascadec.runtime import preempt
from cascadec.runtime.context import StageContext
from cascadec.runtime.data.chat import DEFAULT_TEMPLATE
from cascadec.runtime.stages import dpo
from cascadec.runtime.training import pairs

ANSWERS = ["return a + b", "self.items = []", "print(i * i, 'squared')", "The quick brown fox", "12 + 30 = 42",
           "def push(self, x):"]
DPO = {
    "id": "dpo/tiny/instruct/dpo", "kind": "dpo", "hash": "test",
    "config": {
        "seq_len": 40, "global_batch": 5, "micro_batch": 1, "steps": 6, "beta": 0.5,
        "data": {"name": "prefs", "offset": 0, "shuffle": True},
        "optimizer": {"name": "adamw", "lr": 3e-3, "min_lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 1}, "checkpoint": {"every_steps": 3, "keep": 2},
        "seed": 0, "precision": "fp32", "activation_checkpointing": False, "tokens": 1200,
    },
}


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> dict:
    """Ten pairs, and one whose prompt alone is longer than the window (dropped)."""
    root = tmp_path_factory.mktemp("prefs")
    with (root / "p.jsonl").open("w") as f:
        for i in range(10):
            good, bad = ANSWERS[i % 3], ANSWERS[3 + (i + 1) % 3]  # the first three are always preferred
            f.write(json.dumps({"prompt": f"{i}: say {good[:6]}", "chosen": good, "rejected": bad}) + "\n")
        f.write(json.dumps({"prompt": "def add(a, b): " * 20, "chosen": "x", "rejected": "y"}) + "\n")
    return {"kind": "jsonl", "paths": [str(root / "*.jsonl")], "format": "preference", "name": "prefs"}


def context(tmp: Path, policy: Path, prefs: dict, **config) -> StageContext:
    stage = copy.deepcopy(DPO)
    stage["config"].update(config)
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    return StageContext(stage=stage, inputs={"policy": policy}, data={"prefs": prefs}, out=tmp / "out",
                        scratch=tmp / "scratch", log=lambda msg: None)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_lowers_the_loss_from_log2_over_beta_and_saves_a_loadable_model(tiny_models, prefs, tmp_path):
    ctx = context(tmp_path, tiny_models["student"], prefs)
    metrics = dpo.run(ctx)
    assert (metrics["pairs"], metrics["dropped"], metrics["pairs_seen"], metrics["epochs"]) == (10, 1, 30, 3.0)
    assert metrics["reference_logps"] == "computed"
    losses = [r["loss"] for r in records(ctx.out)]
    # step 1: the policy is the reference, Δ = 0, so the rescaled loss is log(2)/β exactly
    assert losses[0] == pytest.approx(math.log(2) / 0.5, rel=1e-5)
    assert losses[-1] < 0.1 * losses[0]
    assert records(ctx.out)[-1]["margin"] > 0 and records(ctx.out)[-1]["accuracy"] == 1.0
    loaded = AutoModelForCausalLM.from_pretrained(ctx.out / "model")
    before = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in loaded.state_dict().items())
    assert AutoTokenizer.from_pretrained(ctx.out / "model").chat_template == DEFAULT_TEMPLATE


@pytest.mark.slow
def test_reference_logps_are_the_starting_models_and_a_rerun_reads_them_from_the_cache(tiny_models, prefs, tmp_path,
                                                                                         monkeypatch):
    reference = context(tmp_path / "ref", tiny_models["student"], prefs)
    dpo.run(reference)
    [cache] = (tmp_path / "ref" / "scratch" / dpo.CACHE).iterdir()
    values = load_file(str(cache))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    pairs_, _ = dpo.read_pairs(reference, tokenizer, 40)
    start = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float64)
    for i, (a, b) in enumerate(pairs_):
        for side, example in (("chosen", a), ("rejected", b)):
            ids = torch.tensor([example.ids])
            logp = torch.log_softmax(start(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            direct = (logp * torch.tensor(example.mask[1:])).sum().item()
            assert values[side][i].item() == pytest.approx(direct, abs=1e-4)

    # a run stopped on request after step 1, then resumed: the reference never runs again
    ctx = context(tmp_path / "run", tiny_models["student"], prefs)
    ctx.scratch.mkdir(parents=True)
    (ctx.scratch / preempt.STOP_FILE).write_text("")
    with pytest.raises(preempt.Preempted):
        dpo.run(ctx)
    preempt.clear(ctx.scratch)
    calls = []
    monkeypatch.setattr(pairs, "logps", lambda *a, **k: calls.append(1))
    metrics = dpo.run(ctx)
    assert (metrics["reference_logps"], metrics["resumed_from_step"], calls) == ("cached", 1, [])
    a, b = load_file(str(reference.out / "model" / "model.safetensors")), load_file(str(ctx.out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(reference.out)] == [r["loss"] for r in records(ctx.out)]


@pytest.mark.slow
def test_two_fsdp_processes_match_one(tiny_models, prefs, tmp_path):
    """Under fsdp the policy is sharded and the reference's log-probs come from a sharded frozen
    copy, each process passing as many micro-batches (9 chunks over 2 processes: one repeats a
    chunk and drops it); the same cached values, losses and weights as one process."""
    from cascadec.runtime import executor

    nine = tmp_path / "nine.jsonl"  # 9 pairs: 9 reference chunks, so one process runs a spare one
    nine.write_text("".join(Path(prefs["paths"][0].replace("*.jsonl", "p.jsonl")).read_text().splitlines(True)[:9]))
    prefs = {**prefs, "paths": [str(nine)]}
    one = context(tmp_path / "one", tiny_models["student"], prefs, global_batch=4, steps=3)
    dpo.run(one)
    two = context(tmp_path / "two", tiny_models["student"], prefs, global_batch=4, steps=3)
    two.stage["launch"] = {"devices": 2, "nodes": 1, "launcher": "accelerate", "strategy": "fsdp"}
    two.stage["estimate"] = {"memory_gb": 100, "device_memory_gb": 80}  # no room for a whole reference
    two.scratch.mkdir(parents=True)
    lines = []
    two.log = lines.append
    result = executor._spawn(two)
    assert (result["processes"], result["reference_logps"]) == (2, "computed"), "\n".join(lines[-40:])
    assert any("reference sharded: the plan's estimate" in line for line in lines)
    [c1], [c2] = [list((run.scratch / dpo.CACHE).iterdir()) for run in (one, two)]
    v1, v2 = load_file(str(c1)), load_file(str(c2))
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(v1[side], v2[side], rtol=0, atol=1e-5)
    assert [r["loss"] for r in records(two.out)] == pytest.approx([r["loss"] for r in records(one.out)], rel=1e-5)
    a = load_file(str(one.out / "model" / "model.safetensors"))
    b = AutoModelForCausalLM.from_pretrained(two.out / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_order_reads_every_record_once_per_epoch_and_depends_only_on_the_slot():
    order = pairs.order(7, seed=3, shuffle=True)
    first, second = [order(g) for g in range(7)], [order(g) for g in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [pairs.order(7, seed=3, shuffle=True)(g) for g in (12, 3)] == [second[5], first[3]]
    assert [pairs.order(4, seed=3, shuffle=False)(g) for g in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [list(pairs.my_slots(2, 8, p, 2)) for p in (0, 1)] == [[16, 17, 18, 19], [20, 21, 22, 23]]


def test_truncate_keeps_the_prompt_and_drops_a_pair_without_answer_tokens():
    from cascadec.runtime.data.chat import Example

    example = Example(ids=[1, 5, 6, 7, 8, 2], mask=[0, 0, 1, 1, 1, 1])
    assert pairs.truncate(example, 4) == Example(ids=[1, 5, 6, 7], mask=[0, 0, 1, 1])
    assert pairs.truncate(example, 2) is None


def test_a_steps_gradient_does_not_depend_on_how_its_pairs_are_cut_into_micro_batches(tiny_models, prefs):
    """Each pair weighs 1/global_batch: 4 micro-batches of 1 pair and 1 of 4 give one gradient."""
    from accelerate import Accelerator

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    ctx = context(Path("/nonexistent"), tiny_models["student"], prefs)
    records_, _ = dpo.read_pairs(ctx, tokenizer, 40)
    chosen = records_[:4]
    accelerator = Accelerator(cpu=True)
    grads = []
    for micro in (1, 4):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
        objective = pairs.SequenceLogps(model)
        with torch.no_grad():
            ref = [objective(*pairs.padded([p[side] for p in chosen], 0, "cpu")) - 0.5 * side for side in (0, 1)]
        micros = [pairs.Micro(a=[p[0] for p in chosen[k:k + micro]], b=[p[1] for p in chosen[k:k + micro]],
                              ref_a=ref[0][k:k + micro], ref_b=ref[1][k:k + micro]) for k in range(0, 4, micro)]
        pairs.update(accelerator, objective, micros, beta=0.5, weight=1 / 4, pad_id=0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
