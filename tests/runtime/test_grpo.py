"""The grpo stage on a tiny policy with an exact-answer reward (`grporewards.exact`): the reward
rises, SIGKILL then resume gives identical weights, two processes (ddp, fsdp) make one process's
update, an fsdp run stopped and relaunched reaches the uninterrupted weights, it runs through the
executor, and the plan's settings reach the arithmetic."""

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
from cascadec.runtime.context import StageContext
from cascadec.runtime.stages import grpo

HERE = Path(__file__).resolve().parent  # grporewards.py, which the plan's reward names
PY = sys.executable
ANSWER_ID = 300  # decodes to "an"
GRPO = {
    "id": "grpo/tiny/reasoning/grpo", "kind": "grpo", "hash": "test",
    "config": {
        "seq_len": 32, "global_batch": 4, "micro_batch": 4, "steps": 30, "beta": 0.0, "prompts": 120,
        "data": {"name": "prompts", "offset": 0, "shuffle": True},
        "generation": {"samples": 8, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6},
        "judges": {"exact": {"kind": "reward_function", "function": "grporewards:exact", "weight": 1.0}},
        "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "magistral", "scale_rewards": "minibatch",
        "mask_truncated_completions": False, "drop_constant_groups": True, "refill_rounds": 2,
        "num_iterations": 1, "reward_workers": 0,
        "optimizer": {"name": "adamw", "lr": 2e-2, "min_lr": 2e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"kind": "constant", "warmup_steps": 0}, "checkpoint": {"every_steps": 4, "keep": 2},
        "seed": 0, "precision": "fp32", "activation_checkpointing": False,
    },
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny policy that ends its answers and sometimes starts with the answer: every embedding
    carries a constant channel, which the final norm keeps at about √hidden, and the head turns it
    into an EOS logit of about +3 and an "an" logit of about +2.5 at every position (a random
    model would neither end nor ever answer)."""
    path = save_model(tmp_path_factory.mktemp("grpo") / "policy", "mistral", seed=2, layers=2, hidden=32, ffn=64,
                      heads=2, kv_heads=1)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.embed_tokens.weight"][:, 0] = 1.0
    weights["lm_head.weight"][2, 0] = 3.0 / 32 ** 0.5  # token 2 is the tokenizer's EOS
    weights["lm_head.weight"][ANSWER_ID, 0] = 2.5 / 32 ** 0.5
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prompts")
    with (root / "p.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"answer {i}", "answer": "an", "level": i % 3}) + "\n")
    return {"kind": "jsonl", "paths": [str(root / "*.jsonl")], "format": "prompts", "name": "prompts"}


@pytest.fixture(autouse=True)
def rewards_importable(monkeypatch):
    importable(monkeypatch, HERE)


def stage(**config) -> dict:
    return prompts_stage(GRPO, **config)


@pytest.mark.slow
def test_grpo_raises_the_exact_answer_reward(policy, prompts, tmp_path):
    ctx = context(tmp_path, stage(steps=16, reward_workers=1), policy, prompts)
    metrics = grpo.run(ctx)
    lines = records(ctx.out)
    assert [r["step"] for r in lines] == list(range(1, 17))
    reward = [r["reward_mean"] for r in lines]
    assert sum(reward[:5]) / 5 < 0.25
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.4  # the asserted margin (fixed seeds)
    for key in ("loss", "reward/exact/mean", "reward/exact/std", "dropped_share", "refill_rounds", "clip_low",
                "clip_high", "entropy", "mean_length", "truncated_share", "gen_tokens_per_s", "groups", "lr"):
        assert all(key in r for r in lines), key
    trained = [r for r in lines if r["groups"]]
    assert all(r["clip_low"] == 0 and r["clip_high"] == 0 for r in trained)  # ratio 1: one update per batch
    assert trained[-1]["entropy"] < 0.5 * trained[0]["entropy"]  # the policy settles on its answer
    assert any(r["dropped_share"] > 0 for r in lines) and all(0 <= r["refill_rounds"] <= 2 for r in lines)
    assert lines[-1]["prompts"] == metrics["prompts_drawn"] > 16 * 4  # refills draw more prompts
    assert all(metrics[k] > 0 for k in grpo.SPLIT)
    loaded = AutoModelForCausalLM.from_pretrained(ctx.out / "model")
    assert loaded.config.vocab_size == 320
    assert any(not torch.equal(v, weights(ctx.out)[k]) for k, v in load_file(str(policy / "model.safetensors")).items())
    assert AutoTokenizer.from_pretrained(ctx.out / "model").eos_token_id == 2


STAGE_MAIN = ["-m", "cascadec.runtime.stage_main", "--ctx-json"]


@pytest.mark.slow
def test_sigkill_mid_grpo_then_resume_gives_identical_weights(policy, prompts, tmp_path):
    st = stage(steps=12)
    reference = context(tmp_path / "ref", st, policy, prompts)
    grpo.run(reference)

    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    raw = {"stage": st, "inputs": {"policy": str(policy)}, "data": {"prompts": prompts}, "out": str(run / "out"),
           "scratch": str(run / "scratch"), "result": str(run / "result.json")}
    (run / "ctx.json").write_text(json.dumps(raw))
    checkpoints = run / "scratch" / "checkpoints"
    proc = subprocess.Popen([PY, *STAGE_MAIN, str(run / "ctx.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
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
    a, b = weights(reference.out), weights(run / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("loss", "reward_mean", "prompts", "dropped_share", "mean_length")
    assert [{k: r.get(k) for k in keep} for r in records(reference.out)] == \
           [{k: r.get(k) for k in keep} for r in records(run / "out")]
    AutoModelForCausalLM.from_pretrained(run / "out" / "model")


def two_processes(tmp: Path, st: dict, policy: Path, prompts: dict, strategy: str) -> tuple[StageContext, list]:
    """A context for ``st`` launched on 2 gloo processes (`accelerate launch`), and its log lines."""
    launched = {**st, "launch": {"devices": 2, "nodes": 1, "launcher": "accelerate", "strategy": strategy},
                "estimate": {"memory_gb": 100, "device_memory_gb": 80}}  # no room for a whole reference
    ctx = context(tmp, launched, policy, prompts)
    ctx.scratch.mkdir(parents=True)
    lines = []
    ctx.log = lines.append
    return ctx, lines


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(policy, prompts, tmp_path, strategy):
    """3 groups of 8 per step: a round's slots are shared 1 + 2 over the processes, constant groups
    are dropped and refilled from the next slots (the kept list and the refills are global), then
    the 3 kept groups are trained 1 + 2 (micro-batches of 4: 2 on one process, 4 on the other,
    which pads with 2 weightless ones). Same samples, same global normalisers: the same metrics,
    the loss within 1e-5 relative and the weights within 1e-5 absolute (the gradient reduction sums
    in another order); the gradient norm too, which Adam's scale invariance would otherwise hide
(a gradient half the size moves the weights by almost as much). ddp: TRL's dapo (the batch's token count); fsdp: the magistral normaliser
    with a beta > 0 reference, which the plan's estimate has sharded, both scored at T = 0.8."""
    options = {"loss_type": "dapo"} if strategy == "ddp" else {
        "beta": 0.04, "generation": {**GRPO["config"]["generation"], "temperature": 0.8}}
    st = stage(steps=3, global_batch=3, micro_batch=4, **options,
               optimizer={**GRPO["config"]["optimizer"], "lr": 1e-3, "min_lr": 1e-3})
    one = context(tmp_path / "one", st, policy, prompts)
    grpo.run(one)
    two, lines = two_processes(tmp_path / "two", st, policy, prompts, strategy)
    result = executor._spawn(two)
    assert result["processes"] == 2, "\n".join(lines[-40:])
    first, second = records(one.out), records(two.out)
    assert any(r["dropped_share"] > 0 and r["refill_rounds"] > 0 for r in first)  # dropped, then refilled
    assert any(r["groups"] % 2 for r in first)  # kept groups that 2 processes cannot share evenly
    exact = ("step", "prompts", "groups", "groups_generated", "dropped_share", "refill_rounds", "reward_mean",
             "reward_std", "reward/exact/mean", "mean_length", "truncated_share", "clip_low", "clip_high")
    assert [{k: r.get(k) for k in exact} for r in second] == [{k: r.get(k) for k in exact} for r in first]
    for key in ("loss", "grad_norm", "entropy", "kl"):  # None on a step that kept no group
        assert [r[key] is None for r in second] == [r[key] is None for r in first], key
        assert [r[key] for r in second if r[key] is not None] == \
               pytest.approx([r[key] for r in first if r[key] is not None], rel=1e-5, abs=1e-9), key
    a, b = weights(one.out), weights(two.out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert any(not torch.equal(v, b[k]) for k, v in load_file(str(policy / "model.safetensors")).items())
    if strategy == "fsdp":
        assert any("reference sharded: the plan's estimate" in line for line in lines), "\n".join(lines[-40:])
    AutoModelForCausalLM.from_pretrained(two.out / "model")


@pytest.mark.slow
def test_fsdp_stopped_then_resumed_gives_the_uninterrupted_weights(policy, prompts, tmp_path):
    """Two fsdp processes stopped after step 1 (a DCP step checkpoint: shards, optimiser, schedule,
    the next slot, RNG) and relaunched reach exactly the weights of an uninterrupted two-process run,
    with the same metrics."""
    st = stage(steps=2, global_batch=3, micro_batch=4, checkpoint={"every_steps": 100, "keep": 2})
    whole, _ = two_processes(tmp_path / "whole", st, policy, prompts, "fsdp")
    executor._spawn(whole)
    run, lines = two_processes(tmp_path / "run", st, policy, prompts, "fsdp")
    (run.scratch / preempt.STOP_FILE).write_text("")  # asked before it starts: it stops after step 1
    with pytest.raises(preempt.Preempted):
        executor._spawn(run)
    preempt.clear(run.scratch)
    result = executor._spawn(run)
    assert result["resumed_from_step"] == 1, "\n".join(lines[-40:])
    a, b = weights(whole.out), weights(run.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("loss", "reward_mean", "prompts", "dropped_share", "groups", "mean_length")
    assert [{k: r.get(k) for k in keep} for r in records(whole.out)] == \
           [{k: r.get(k) for k in keep} for r in records(run.out)]


@pytest.mark.slow
def test_through_the_executor_with_a_kl_reference_and_trl_settings(policy, prompts, tmp_path):
    """beta > 0 loads the reference (k3 KL 0 at the first step: the policy is the reference);
    TRL's dapo with group scaling and truncated completions masked; a bad option is one error line."""
    st = stage(steps=2, beta=0.04, loss_type="dapo", scale_rewards="group", mask_truncated_completions=True,
               drop_constant_groups=False)
    st.update(needs=[], outputs=[f"stages/{st['id']}/model"], launch={"devices": 1, "launcher": "local"},
              inputs=[{"role": "policy", "model": "policy"}, {"role": "data", "data": "prompts"}])
    plan = {"spec_sha256": "0" * 64, "models": {"policy": {"source": {"path": str(policy)}}},
            "data": {"prompts": {k: v for k, v in prompts.items() if k != "name"}}, "stages": [st]}
    lines = []
    assert executor.run_plan(plan, tmp_path / "work", tmp_path, out=lines.append) == 0, "\n".join(lines)
    out = tmp_path / "work" / "stages" / st["id"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["prompts_drawn"] == 8
    first = records(out)[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["dropped_share"] == 0 and first["groups"] == 4
    AutoModelForCausalLM.from_pretrained(out / "model")

    st["config"]["num_iterations"] = 2
    st["hash"] = "changed"
    lines.clear()
    assert executor.run_plan(plan, tmp_path / "work", tmp_path, out=lines.append) == 1
    assert lines[-1] == (f"error: stage {st['id']} failed: num_iterations 2: this runtime makes one update per batch "
                         f"of samples (Magistral's n_batch = n_minibatch); set `num_iterations: 1` "
                         f"(traceback in scratch/{st['id']}/traceback.txt)")


def test_a_completion_no_reward_applies_to_takes_its_groups_mean():
    assert grpo.filled([1.0, None, 0.0, 0.5, None, None], 3) == [1.0, 0.5, 0.0, 0.5, 0.5, 0.5]
    assert grpo.filled([None, None], 2) == [0.0, 0.0]


def test_micro_batch_counts_completions_and_shares_are_contiguous():
    """grpo's micro_batch counts completions (global_batch × G), dpo's and odpo's pairs; a process's
    share of a round's slots, or of the kept groups, is contiguous and at most one item longer."""
    from cascadec.runtime.training import pairs

    st = stage(global_batch=3, micro_batch=4)
    assert pairs.micro_batches(st, 3, 2, 4) == 3  # 24 completions: 3 micro-batches of 4 per process
    with pytest.raises(ValueError) as caught:
        pairs.micro_batches(st, 3, 2, 5)
    assert str(caught.value) == ("grpo: global_batch 3 prompts × 8 samples = 24 completions per step is not a multiple "
                                 "of micro_batch 5 completions × 2 processes; set micro_batch (completions per "
                                 "forward) so that micro_batch × 2 divides 24")
    assert pairs.micro_batches({"kind": "odpo", "config": {}}, 8, 2, 4) == 1
    with pytest.raises(ValueError, match=r"^global_batch 3 is not a multiple of micro_batch 4 × 2 processes$"):
        pairs.micro_batches({"kind": "odpo", "config": {}}, 3, 2, 4)
    assert [grpo.share(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    assert [grpo.share(2, r, 3) for r in range(3)] == [(0, 0), (0, 1), (1, 2)]


def test_options_default_to_the_magistral_preset_and_refuse_bad_names():
    assert grpo.options({}) == {"beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "magistral",
                                "scale_rewards": "minibatch", "mask_truncated_completions": False,
                                "drop_constant_groups": True, "refill_rounds": 2, "num_iterations": 1,
                                "reward_workers": 2}
    assert grpo.options({"epsilon": 0.1, "epsilon_high": None})["epsilon_high"] == 0.1
    with pytest.raises(ValueError, match="unknown loss_type 'bnpo'; expected one of magistral, grpo, dr_grpo, dapo"):
        grpo.options({"loss_type": "bnpo"})


def test_scored_logps_and_entropies_equal_the_full_logits(policy):
    """Per-token log-probs and entropies in chunks of 3 equal log_softmax over the model's full logits."""
    from cascadec.runtime.training.preference import scored_logps, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float64)
    ids = torch.tensor([[5, 17, 40, 2, 0, 0], [9, 300, 300, 12, 61, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    trained = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    rows, cols, logps, entropies = scored_logps(model, ids, attention, trained, chunk_tokens=3, entropy=True)
    full = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits, -1)
    assert (rows.tolist(), cols.tolist()) == ([0, 0, 1, 1, 1], [1, 2, 2, 3, 4])
    torch.testing.assert_close(logps, full[rows, cols].gather(-1, ids[rows, cols + 1, None]).squeeze(-1))
    torch.testing.assert_close(entropies, -(full.exp() * full).sum(-1)[rows, cols])
    torch.testing.assert_close(sequence_logps(model, ids, attention, trained, chunk_tokens=3),
                               torch.zeros(2, dtype=logps.dtype).index_add(0, rows, logps))
    # at the sampling temperature: the log-probs and entropies of softmax(z / T), as the samples were drawn
    _, _, hot, hot_entropies = scored_logps(model, ids, attention, trained, chunk_tokens=3, entropy=True,
                                            temperature=0.7)
    tempered = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits / 0.7, -1)
    torch.testing.assert_close(hot, tempered[rows, cols].gather(-1, ids[rows, cols + 1, None]).squeeze(-1))
    torch.testing.assert_close(hot_entropies, -(tempered.exp() * tempered).sum(-1)[rows, cols])
