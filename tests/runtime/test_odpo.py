"""The odpo stage on a tiny policy with a rule-based judge (`rulejudges.shorter`): the win rate
against the starting policy rises, SIGKILL then resume is bit-identical, two processes equal one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from stagekit import importable, prompts_stage, records, weights
from stagekit import prompts_context as context
from tinymodels import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from cascadec.runtime import executor, preempt
from cascadec.runtime.data.chat import DEFAULT_TEMPLATE
from cascadec.runtime.stages import odpo

HERE = Path(__file__).resolve().parent  # rulejudges.py, which the plan's judge names
PY = sys.executable
ODPO = {
    "id": "odpo/tiny/instruct/odpo", "kind": "odpo", "hash": "test",
    "config": {
        "seq_len": 48, "global_batch": 8, "micro_batch": 2, "steps": 30, "beta": 0.1, "prompts": 240,
        "data": {"name": "prompts", "offset": 0, "shuffle": True},
        "generation": {"samples": 2, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 12},
        "judges": {"short": {"kind": "callable", "function": "rulejudges:shorter", "temperature": 1.0}},
        "strip_thinking": False, "win_rate": {"prompts": 16, "every_steps": 10},
        "optimizer": {"name": "adamw", "lr": 1e-2, "min_lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 1}, "checkpoint": {"every_steps": 5, "keep": 2},
        "seed": 0, "precision": "fp32", "activation_checkpointing": False,
    },
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny policy that ends its answers: every embedding carries a constant channel, which the
    final norm keeps at about √hidden, and the head turns into an EOS logit of about +3 at every
    position, so at T = 0.7 a sample ends after ~5 tokens (a random model would never end)."""
    path = save_model(tmp_path_factory.mktemp("odpo") / "policy", "mistral", seed=2, layers=2, hidden=32, ffn=64,
                      heads=2, kv_heads=1)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.embed_tokens.weight"][:, 0] = 1.0
    weights["lm_head.weight"][2, 0] = 3.0 / 32 ** 0.5  # token 2 is the tokenizer's EOS
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prompts")
    with (root / "p.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"say {i} things", "level": i % 3}) + "\n")
    return {"kind": "jsonl", "paths": [str(root / "*.jsonl")], "format": "prompts", "name": "prompts"}


@pytest.fixture(autouse=True)
def judges_importable(monkeypatch):
    importable(monkeypatch, HERE)


def stage(**config) -> dict:
    return prompts_stage(ODPO, **config)


@pytest.mark.slow
def test_odpo_with_a_rule_judge_raises_the_win_rate_against_the_starting_policy(policy, prompts, tmp_path):
    ctx = context(tmp_path, stage(), policy, prompts)
    metrics = odpo.run(ctx)
    assert (metrics["prompts"], metrics["heldout_prompts"], metrics["prompts_seen"]) == (24, 16, 240)
    assert 0.3 <= metrics["win_rate_start"] <= 0.65  # two samples of one policy: about even
    assert metrics["win_rate"] >= 0.75
    lines = records(ctx.out)
    assert [r["step"] for r in lines if "win_rate" in r] == [0, 10, 20, 30]
    assert lines[0]["win_rate"] == metrics["win_rate_start"] and lines[-1]["win_rate"] == metrics["win_rate"]
    first, last = lines[1], lines[-1]
    assert first["loss"] == pytest.approx(0.6931471805599453 / 0.1, rel=1e-5)  # Δ = 0 at the start: log(2)/β
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference
    length = [r["mean_length"] for r in lines[1:]]
    assert last["kl"] > 0.5 and sum(length[-5:]) < 0.8 * sum(length[:5])  # it learned to be short
    for key in ("margin", "chosen_logps", "rejected_logps", "loop_rate", "unterminated_rate", "gen_tokens_per_s",
                "lr", "grad_norm"):
        assert all(key in r for r in lines[1:]), key
    assert all(metrics[k] > 0 for k in odpo.SPLIT)
    loaded = AutoModelForCausalLM.from_pretrained(ctx.out / "model")
    assert any(not torch.equal(v, weights(ctx.out)[k]) for k, v in load_file(str(policy / "model.safetensors")).items())
    assert loaded.config.vocab_size == 320
    assert AutoTokenizer.from_pretrained(ctx.out / "model").chat_template == DEFAULT_TEMPLATE


STAGE_MAIN = ["-m", "cascadec.runtime.stage_main", "--ctx-json"]


@pytest.mark.slow
def test_sigkill_mid_odpo_then_resume_gives_bit_identical_weights(policy, prompts, tmp_path):
    st = stage(steps=40, win_rate={"prompts": 8, "every_steps": 20})
    reference = context(tmp_path / "ref", st, policy, prompts)
    odpo.run(reference)

    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    raw = {"stage": st, "inputs": {"policy": str(policy)}, "data": {"prompts": prompts}, "out": str(run / "out"),
           "scratch": str(run / "scratch"), "result": str(run / "result.json")}
    (run / "ctx.json").write_text(json.dumps(raw))
    checkpoints = run / "scratch" / "checkpoints"
    proc = subprocess.Popen([PY, *STAGE_MAIN, str(run / "ctx.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # land between checkpoints, not on one
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists(), "the run finished before it could be killed"
    killed_at = int(sorted(checkpoints.glob("step-*"))[-1].name.split("-")[1])

    subprocess.run([PY, *STAGE_MAIN, str(run / "ctx.json")], check=True, capture_output=True)
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_from_step"] == killed_at > 0
    assert result["win_rate_start"] == records(reference.out)[0]["win_rate"]  # carried by the checkpoint
    a, b = weights(reference.out), weights(run / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("loss", "kl", "mean_length", "win_rate")
    assert [{k: r.get(k) for k in keep} for r in records(reference.out)] == \
           [{k: r.get(k) for k in keep} for r in records(run / "out")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(policy, prompts, tmp_path, strategy):
    """Same global batch of 8 prompts: one process takes all 8 (4 micro-batches), two take 4 each.
    Every sample is drawn from (seed, step, slot), so both runs judge and train on the same pairs;
    weights within 1e-5 (the gradient all-reduce sums in another order). Under fsdp the policy and
    the reference are sharded (the plan's estimate gives no room for a whole reference) and the
    samples come from a whole copy refreshed from the shards: the same samples, the same weights."""
    st = stage(steps=4, win_rate={"prompts": 8, "every_steps": 2},
               optimizer={**ODPO["config"]["optimizer"], "lr": 1e-3, "min_lr": 1e-4})
    one = context(tmp_path / "one", st, policy, prompts)
    odpo.run(one)
    two_stage = {**st, "launch": {"devices": 2, "nodes": 1, "launcher": "accelerate", "strategy": strategy},
                 "estimate": {"memory_gb": 100, "device_memory_gb": 80}}
    two = context(tmp_path / "two", two_stage, policy, prompts)
    two.scratch.mkdir(parents=True)
    lines = []
    two.log = lines.append
    result = executor._spawn(two)
    assert result["processes"] == 2, "\n".join(lines[-40:])
    assert [r["loss"] for r in records(two.out)[1:]] == pytest.approx([r["loss"] for r in records(one.out)[1:]],
                                                                      rel=1e-5)
    wins = [[(r["step"], r["win_rate"]) for r in records(run.out) if "win_rate" in r] for run in (one, two)]
    assert [s for s, _ in wins[0]] == [s for s, _ in wins[1]] == [0, 2, 4]
    assert [w for _, w in wins[1]] == pytest.approx([w for _, w in wins[0]], rel=1e-5)
    a, b = weights(one.out), weights(two.out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    if strategy == "fsdp":
        assert any("reference sharded: the plan's estimate" in line for line in lines), "\n".join(lines[-40:])
        assert AutoModelForCausalLM.from_pretrained(two.out / "model").config.model_type == "mistral"


@pytest.mark.slow
def test_fsdp_stopped_then_resumed_gives_the_uninterrupted_weights(policy, prompts, tmp_path):
    """Two fsdp processes stopped after step 1 (a DCP step checkpoint: shards, optimiser, schedule,
    RNG) and relaunched reach exactly the weights of an uninterrupted two-process run."""
    st = {**stage(steps=4, win_rate={"prompts": 4, "every_steps": 2}, checkpoint={"every_steps": 100, "keep": 2}),
          "launch": {"devices": 2, "nodes": 1, "launcher": "accelerate", "strategy": "fsdp"}}
    whole = context(tmp_path / "whole", st, policy, prompts)
    whole.scratch.mkdir(parents=True)
    executor._spawn(whole)
    run = context(tmp_path / "run", st, policy, prompts)
    run.scratch.mkdir(parents=True)
    (run.scratch / preempt.STOP_FILE).write_text("")  # asked before it starts: it stops after step 1
    with pytest.raises(preempt.Preempted):
        executor._spawn(run)
    preempt.clear(run.scratch)
    result = executor._spawn(run)
    assert result["resumed_from_step"] == 1, result
    a, b = weights(whole.out), weights(run.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bf16_runs_under_autocast_with_a_bf16_reference_and_saves_bf16(policy, prompts, tmp_path, monkeypatch):
    """precision bf16 forced on the CPU (Accelerate autocasts there as on a GPU): generation,
    the bf16 reference, the loss and the save all take the bf16 path."""
    from accelerate.state import AcceleratorState

    from cascadec.runtime.training import loop

    monkeypatch.setattr(loop, "mixed_precision", lambda precision: "bf16")
    ctx = context(tmp_path, stage(steps=2, precision="bf16", win_rate={"prompts": 4, "every_steps": 1}), policy,
                  prompts)
    AcceleratorState._reset_state(True)  # the process-wide state holds one precision
    try:
        metrics = odpo.run(ctx)
    finally:
        AcceleratorState._reset_state(True)
    assert metrics["dtype"] == "bfloat16"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(ctx.out)[1:])
    assert records(ctx.out)[1]["loss"] == pytest.approx(0.6931471805599453 / 0.1, rel=1e-2)
    assert {v.dtype for v in weights(ctx.out).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(ctx.out / "model").dtype == torch.bfloat16


@pytest.mark.slow
def test_through_the_executor_a_stage_gets_its_roles_and_a_bad_judge_is_one_error_line(policy, prompts, tmp_path):
    st = stage(steps=2, win_rate={"prompts": 4, "every_steps": 1})
    st.update(needs=[], outputs=[f"stages/{st['id']}/model"], launch={"devices": 1, "launcher": "local"},
              inputs=[{"role": "policy", "model": "policy"}, {"role": "data", "data": "prompts"}])
    plan = {"spec_sha256": "0" * 64, "models": {"policy": {"source": {"path": str(policy)}}},
            "data": {"prompts": {k: v for k, v in prompts.items() if k != "name"}}, "stages": [st]}
    lines = []
    assert executor.run_plan(plan, tmp_path / "work", tmp_path, out=lines.append) == 0, "\n".join(lines)
    manifest = json.loads((tmp_path / "work" / "stages" / st["id"] / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and 0 <= manifest["metrics"]["win_rate"] <= 1
    AutoModelForCausalLM.from_pretrained(tmp_path / "work" / "stages" / st["id"] / "model")

    st["config"]["judges"] = {"short": {"kind": "callable", "function": "rulejudges:longest"}}
    st["hash"] = "changed"
    lines.clear()
    assert executor.run_plan(plan, tmp_path / "work", tmp_path, out=lines.append) == 1
    assert lines[-1] == (f"error: stage {st['id']} failed: judge 'short': module 'rulejudges' has no function 'longest' "
                         f"(traceback in scratch/{st['id']}/traceback.txt)")


@pytest.fixture(scope="module")
def answered(tmp_path_factory) -> dict:
    """Arithmetic prompts with an exact `answer`, as `builtin: tasks` makes them."""
    root = tmp_path_factory.mktemp("answered")
    with (root / "p.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"what is {i} + 1?", "answer": str(i + 1)}) + "\n")
    return {"kind": "jsonl", "paths": [str(root / "*.jsonl")], "format": "prompts", "name": "prompts"}


@pytest.mark.slow
def test_odpo_with_a_compare_rewards_judge_learns_what_its_rewards_prefer(policy, answered, tmp_path):
    """A rule-based judge from grpo's rewards (math against the records' `answer`, a length penalty
    from 1 token on): P = σ((R_a − R_b)/0.1), so the shorter answer wins and the win rate rises; each
    reward's mean over the step's answers is logged, the math one a number (the records' answers
    reached it), and the checkpoint loads back."""
    judges = {"rules": {"kind": "compare_rewards", "rewards": ["math", "len"], "temperature": 0.1},
              "math": {"kind": "math_answer", "weight": 0.9},
              "len": {"kind": "length", "weight": 1.0, "max_tokens": 12, "cache_tokens": 11}}
    logged = []
    ctx = context(tmp_path, stage(steps=30, judges=judges, win_rate={"prompts": 16, "every_steps": 10}), policy,
                  answered)
    ctx.log = logged.append
    metrics = odpo.run(ctx)
    assert metrics["judge"] == "rules" and metrics["judge_kind"] == "compare_rewards"
    assert any("judge rules (compare_rewards of math ×0.9, len ×1, T 0.1)" in line for line in logged), logged
    lines = records(ctx.out)
    assert [r["step"] for r in lines if "win_rate" in r] == [0, 10, 20, 30]
    assert 0.3 <= metrics["win_rate_start"] <= 0.65 and metrics["win_rate"] >= 0.75
    steps = lines[1:]
    assert all(isinstance(r["reward_math"], float) and 0 <= r["reward_math"] <= 1 for r in steps)
    assert all(-1 <= r["reward_len"] <= 0 for r in steps)
    assert sum(r["reward_len"] for r in steps[-5:]) > sum(r["reward_len"] for r in steps[:5])  # shorter answers
    assert metrics["final_reward_len"] == steps[-1]["reward_len"]
    loaded = AutoModelForCausalLM.from_pretrained(ctx.out / "model")
    assert loaded.config.vocab_size == 320
    assert any(not torch.equal(v, weights(ctx.out)[k]) for k, v in load_file(str(policy / "model.safetensors")).items())
