"""`strategy: fsdp` (FSDP2) on CPU/gloo through the executor's own launch path: two processes
equal one, a SIGKILL mid-stage resumes to the same weights, each rank holds half the teacher, the
gathered checkpoint loads with `from_pretrained`; and the world-size-1 path in bf16."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from stagekit import context, stage
from transformers import AutoModelForCausalLM, modeling_utils

from cascadec.runtime import executor
from cascadec.runtime.stages import control, distill
from cascadec.runtime.training import fsdp
from cascadec.runtime.training import train as train_module

FSDP2 = {"devices": 2, "nodes": 1, "launcher": "accelerate", "strategy": "fsdp"}
STEPS = 24  # long enough for a kill to land between checkpoints (every 4 steps)


def fsdp_stage(**launch) -> dict:
    st = stage(steps=STEPS, micro_batch=1, checkpoint={"every_steps": 4, "keep": 2})
    return {**st, "launch": {**FSDP2, **launch}}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def spawn(tmp: Path, st: dict, models: dict, corpus: dict, cache: Path):
    """Run ``st`` as `cascadec run` does for a multi-process stage (`executor._spawn`)."""
    ctx = context(tmp, st, dict(models), corpus, cache=cache)
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    lines = []
    ctx.log = lines.append
    try:
        return ctx, executor._spawn(ctx)
    except RuntimeError as e:
        raise AssertionError("\n".join(lines[-60:])) from e


@pytest.fixture(scope="module")
def two(tiny_models, corpus, tmp_path_factory):
    """One uninterrupted two-process FSDP2 distill run: (context, metrics)."""
    root = tmp_path_factory.mktemp("fsdp-two")
    return spawn(root / "two", fsdp_stage(), tiny_models, corpus, root / "cache")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process(two, tiny_models, corpus, tmp_path):
    """Same global batch of 4; the 1-process run is the plain (unsharded) loop. The only
    difference is the summation order of the gradient reduce-scatter: 1e-4 relative."""
    one = context(tmp_path / "one", stage(steps=STEPS, micro_batch=1), dict(tiny_models), corpus)
    distill.run(one)
    ctx, metrics = two
    assert metrics["processes"] == 2 and metrics["strategy"] == "fsdp"
    assert losses(ctx.out) == pytest.approx(losses(one.out), rel=1e-4)
    a, b = weights(one.out), weights(ctx.out)
    assert a.keys() == b.keys()  # the tied/untied layout of save_pretrained, no FSDP prefixes
    assert max(relative_error(a[k], b[k]) for k in a) < 1e-4
    # the gathered checkpoint is a Hugging Face one, in fp32 like the plan
    loaded = AutoModelForCausalLM.from_pretrained(ctx.out / "model")
    assert loaded.dtype == torch.float32
    assert all(torch.equal(v, b[k]) for k, v in loaded.state_dict().items() if k in b)
    # step checkpoints are DCP shards plus one state file per rank
    checkpoint = sorted((ctx.scratch / "checkpoints").glob("step-*"))[-1]
    assert checkpoint.name == f"step-{STEPS - 4:08d}"
    assert sorted(p.name for p in checkpoint.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2


@pytest.mark.slow
def test_each_rank_holds_half_the_teacher_and_the_student(two, tiny_models):
    _, metrics = two
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    for held, model in ((metrics["teacher_params_per_rank"], teacher), (metrics["student_params_per_rank"], student)):
        total = sum(p.numel() for p in model.parameters())
        assert sum(held) == total and len(held) == 2
        assert all(abs(n - total / 2) <= 0.01 * total for n in held), (held, total)
    assert metrics["teacher_placement"].startswith("sharded: the plan states no device memory")


@pytest.mark.slow
def test_sigkill_mid_fsdp_stage_then_resume_equals_the_uninterrupted_run(two, tiny_models, corpus, tmp_path):
    st = fsdp_stage()
    ctx = context(tmp_path / "run", st, dict(tiny_models), corpus, cache=tmp_path / "cache")
    ctx.scratch.mkdir(parents=True)
    ctx_json = ctx.scratch / "ctx.json"  # what _spawn writes, so the resumed launch reads the same
    fields = {k: getattr(ctx, k) for k in ("stage", "inputs", "data", "out", "scratch", "cache")}
    ctx_json.write_text(json.dumps({**fields, "result": ctx.scratch / "result.json"}, default=str))
    checkpoints = ctx.scratch / "checkpoints"
    proc = subprocess.Popen(executor.launch_command(st, ctx_json), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # land between checkpoints, not on one
    # the launcher and both ranks at once, as a lost node (torchrun starts each rank in its own
    # session, so killing the launcher alone would leave them running)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ctx.scratch / "result.json").exists(), "the run finished before it could be killed"
    killed_at = int(sorted(checkpoints.glob("step-*"))[-1].name.split("-")[1])

    _, metrics = spawn(tmp_path / "run", st, tiny_models, corpus, tmp_path / "cache")
    assert metrics["resumed_from_step"] == killed_at > 0
    reference, _ = two
    assert losses(ctx.out) == losses(reference.out)
    a, b = weights(reference.out), weights(ctx.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_world_size_one_fsdp_in_bf16_writes_a_bf16_checkpoint(tiny_models, corpus, tmp_path, monkeypatch):
    """The single-GPU path (`benchmarks/gpu_check.py`): a local fsdp stage of one process makes
    its own process group; bf16 forced on the CPU gives FSDP2's bf16 mixed-precision policy."""
    local = {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "fsdp"}
    fp32 = context(tmp_path / "fp32", stage(steps=3), dict(tiny_models), corpus)
    distill.run(fp32)
    monkeypatch.setattr(train_module, "mixed_precision", lambda precision: "bf16")
    policies = []
    original = fsdp.policy
    monkeypatch.setattr(fsdp, "policy", lambda compute: policies.append(original(compute)) or policies[-1])
    bf16 = context(tmp_path / "bf16", {**stage(steps=3, precision="bf16"), "launch": local}, dict(tiny_models), corpus)
    AcceleratorState._reset_state(True)
    try:
        metrics = distill.run(bf16)
    finally:
        AcceleratorState._reset_state(True)
    assert not torch.distributed.is_initialized()  # its private group is gone again
    assert metrics["strategy"] == "fsdp" and metrics["processes"] == 1 and metrics["dtype"] == "bfloat16"
    assert [(p.param_dtype, p.reduce_dtype) for p in policies] == [(torch.bfloat16, torch.float32)]
    assert losses(bf16.out) == pytest.approx(losses(fp32.out), rel=2e-2)
    saved = weights(bf16.out)
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert json.loads((bf16.out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(bf16.out / "model").dtype == torch.bfloat16


def test_teacher_placement_follows_the_plans_memory_estimate():
    st = {"launch": FSDP2, "estimate": {"memory_gb": 68.2, "device_memory_gb": 80}}
    assert fsdp.teacher_sharded(st) == (False, "replicated: the plan's estimate with a whole teacher per device, "
                                                "68.2 GB, fits 80 GB")
    st["estimate"]["memory_gb"] = 315.9
    assert fsdp.teacher_sharded(st) == (True, "sharded: the plan's estimate with a whole teacher per device, "
                                               "315.9 GB, exceeds 80 GB")
    assert fsdp.teacher_sharded({"launch": {**FSDP2, "strategy": "ddp"}})[0] is False


def test_activation_checkpointing_under_fsdp_recomputes_layers_and_changes_no_number(tiny_models, corpus, tmp_path,
                                                                                   monkeypatch):
    local = {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "fsdp"}
    plain = context(tmp_path / "plain", stage(steps=3), dict(tiny_models), corpus)
    distill.run(plain)
    recomputed = []
    original = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    sharded = context(tmp_path / "fsdp", {**stage(steps=3, activation_checkpointing=True), "launch": local},
                      dict(tiny_models), corpus)
    assert distill.run(sharded)["strategy"] == "fsdp"
    assert len(recomputed) == 3 * 2 * 2  # steps x micro-batches (2 of 2 in a batch of 4) x student layers
    assert losses(plain.out) == losses(sharded.out)
    a, b = weights(plain.out), weights(sharded.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_that_fits_replicated_stays_whole_and_changes_no_number(tiny_models, corpus, tmp_path):
    local = {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "fsdp"}
    st = {**stage(steps=2), "launch": local, "estimate": {"memory_gb": 0.1, "device_memory_gb": 80}}
    replicated = context(tmp_path / "replicated", st, dict(tiny_models), corpus)
    metrics = distill.run(replicated)
    assert metrics["teacher_placement"].startswith("replicated: the plan's estimate")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    assert metrics["teacher_params_per_rank"] == [sum(p.numel() for p in teacher.parameters())]
    sharded = context(tmp_path / "sharded", {**st, "estimate": {}}, dict(tiny_models), corpus)
    assert distill.run(sharded)["teacher_placement"].startswith("sharded")
    assert losses(replicated.out) == losses(sharded.out)
    a, b = weights(replicated.out), weights(sharded.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_under_fsdp_is_refused_by_the_runtime_too(tiny_models, corpus, tmp_path):
    st = {**stage(steps=1, precision="fp16"), "launch": {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "fsdp"}}
    with pytest.raises(ValueError, match=r"precision fp16 is not supported with strategy fsdp \(the compiler refuses "
                                         r"it: CSC251\); use precision bf16"):
        distill.run(context(tmp_path, st, dict(tiny_models), corpus))


@pytest.mark.slow
def test_a_tied_control_model_initialised_on_rank_0_equals_the_one_process_run(tiny_models, corpus, tmp_path):
    """control: rank 0 initialises the model from the seed, rank 1 builds it on the meta device and
    receives rank 0's weights; the tied head is one parameter, written once."""
    shape = dict(family="mistral", layers=2, hidden=32, ffn=64, heads=2, kv_heads=1, head_dim=16, vocab=320,
                 tied_embeddings=True)
    base = {**stage(), "kind": "control"}
    base["config"] = {**base["config"], "shape": shape, "loss": None}
    st = stage(base, steps=4, micro_batch=1)
    one = context(tmp_path / "one", st, {"template": tiny_models["teacher"]}, corpus)
    control.run(one)
    ctx, metrics = spawn(tmp_path / "two", {**st, "launch": FSDP2}, {"template": tiny_models["teacher"]}, corpus,
                         tmp_path / "cache")
    assert metrics["processes"] == 2 and "teacher_placement" not in metrics
    assert losses(ctx.out) == pytest.approx(losses(one.out), rel=1e-4)
    a, b = weights(one.out), weights(ctx.out)
    assert a.keys() == b.keys() and "lm_head.weight" not in b
    assert max(relative_error(a[k], b[k]) for k in a) < 1e-4
    assert AutoModelForCausalLM.from_pretrained(ctx.out / "model").config.tie_word_embeddings
