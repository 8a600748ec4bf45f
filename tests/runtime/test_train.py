"""The shared training loop through its stages: distill (online and cached), control, bootstrap,
resume after SIGKILL, and two processes against one."""

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
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from stagekit import DISTILL, context, stage, teacher_logits_stage
from tinymodels import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, modeling_utils

from cascadec.runtime import executor
from cascadec.runtime.stages import bootstrap, control, distill, teacher_logits
from cascadec.runtime.training import train as train_module
from cascadec.runtime.data.stream import tokenizer_fingerprint
from cascadec.runtime.training.train import lr_factor

PY = sys.executable


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distill_trains_and_saves_a_loadable_model(tiny_models, corpus, tmp_path):
    ctx = context(tmp_path, stage(), dict(tiny_models), corpus)
    metrics = distill.run(ctx)
    assert metrics["tokens_seen"] == 6 * 16 * 4 and metrics["steps"] == 6
    assert [json.loads(x)["tokens"] for x in (ctx.out / "metrics.jsonl").read_text().splitlines()] == [64 * i for i in range(1, 7)]
    before = load_file(str(tiny_models["student"] / "model.safetensors"))
    after = weights(ctx.out)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    loaded = AutoModelForCausalLM.from_pretrained(ctx.out / "model")
    # the context it was trained at, not the 512 the student was built with (issue: a harness believes it)
    assert AutoConfig.from_pretrained(tiny_models["student"]).max_position_embeddings == 512
    assert loaded.config.max_position_embeddings == 16
    # byte for byte, so the distilled model is still compared equal to its teacher's tokenizer
    assert tokenizer_fingerprint(ctx.out / "model") == tokenizer_fingerprint(tiny_models["student"])


def test_cached_teacher_logits_at_full_vocab_equal_online_distillation(tiny_models, corpus, tmp_path):
    st = stage()
    cfg = st["config"]
    cached_dir = tmp_path / "logits"
    teacher_logits.run(context(cached_dir, teacher_logits_stage(st, 320), {"teacher": tiny_models["teacher"]}, corpus))
    online = context(tmp_path / "online", st, dict(tiny_models), corpus)
    distill.run(online)
    cached_st = stage(loss={**cfg["loss"], "top_k": 320})
    cached = context(tmp_path / "cached", cached_st, {"student": tiny_models["student"],
                                                      "teacher_logits": cached_dir / "out"}, corpus)
    assert distill.run(cached)["teacher"] == "cached"
    assert losses(online.out) == pytest.approx(losses(cached.out), rel=1e-5)
    a, b = weights(online.out), weights(cached.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


SCRATCH_SHAPE = dict(family="mistral", layers=1, hidden=32, ffn=64, heads=2, kv_heads=1, head_dim=16, vocab=320,
                     tied_embeddings=True)


def training_stage(kind: str, models: dict, **config) -> tuple[dict, dict, object]:
    """(stage, inputs, run) of a small distill, control or bootstrap stage."""
    if kind == "distill":
        return stage(**config), dict(models), distill.run
    base = {**DISTILL, "kind": kind, "config": {**DISTILL["config"], "shape": SCRATCH_SHAPE, "loss": None}}
    if kind == "control":
        return stage(base, **config), {"template": models["teacher"]}, control.run
    base["config"]["tokenizer"] = {"vocab_size": 320}
    return stage(base, **config), {}, bootstrap.run


@pytest.mark.parametrize("kind", ["distill", "control", "bootstrap"])
def test_a_bf16_run_through_the_accelerator_matches_fp32_and_saves_bf16(kind, tiny_models, corpus, tmp_path,
                                                                        monkeypatch):
    """precision bf16 forced on the CPU (Accelerate autocasts there as on a GPU): the chunked loss
    runs under autocast, the losses stay within bf16 tolerance of the fp32 run, and the model is
    saved in bf16 with `dtype` in its config.json."""
    st, inputs, run = training_stage(kind, tiny_models, steps=3)
    fp32 = context(tmp_path / "fp32", st, inputs, corpus)
    run(fp32)
    monkeypatch.setattr(train_module, "mixed_precision", lambda precision: "bf16")
    autocast = []
    monkeypatch.setattr(train_module.Accelerator, "autocast",
                        lambda self, original=train_module.Accelerator.autocast: autocast.append(
                            self.mixed_precision) or original(self))
    st16, _, _ = training_stage(kind, tiny_models, steps=3, precision="bf16")
    bf16 = context(tmp_path / "bf16", st16, inputs, corpus)
    AcceleratorState._reset_state(True)  # the process-wide state holds one precision
    try:
        assert run(bf16)["dtype"] == "bfloat16"
    finally:
        AcceleratorState._reset_state(True)
    assert set(autocast) == {"bf16"}
    assert losses(bf16.out) == pytest.approx(losses(fp32.out), rel=2e-2)
    saved, reference = weights(bf16.out), weights(fp32.out)
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert {v.dtype for v in reference.values()} == {torch.float32}  # fp32 plans keep fp32 checkpoints
    assert all(torch.isfinite(v).all() for v in saved.values())
    if kind == "distill":
        before = load_file(str(tiny_models["student"] / "model.safetensors"))
        assert any(not torch.equal(before[k].to(torch.bfloat16), saved[k]) for k in before)
    config = json.loads((bf16.out / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config  # transformers 5 writes `dtype` only
    loaded = AutoModelForCausalLM.from_pretrained(bf16.out / "model")
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items() if k in saved)


def test_activation_checkpointing_recomputes_layers_and_changes_no_number(tiny_models, corpus, tmp_path, monkeypatch):
    plain = context(tmp_path / "plain", stage(), dict(tiny_models), corpus)
    distill.run(plain)
    recomputed = []
    original = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    checkpointed = context(tmp_path / "ckpt", stage(activation_checkpointing=True), dict(tiny_models), corpus)
    distill.run(checkpointed)
    assert recomputed  # the decoder layers went through torch.utils.checkpoint
    assert losses(plain.out) == pytest.approx(losses(checkpointed.out), rel=1e-6)
    a, b = weights(plain.out), weights(checkpointed.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_teacher_with_another_vocabulary_is_a_clear_error(tiny_models, corpus, tmp_path):
    other = save_model(tmp_path / "big-vocab", "mistral", seed=3, vocab=384)
    ctx = context(tmp_path, stage(), {"student": tiny_models["student"], "teacher": other}, corpus)
    with pytest.raises(ValueError, match="teacher vocabulary has 384 entries but the student's has 320"):
        distill.run(ctx)


def test_long_context_phase_writes_rope_into_the_student(tiny_models, corpus, tmp_path):
    rope = {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512},
            "max_position_embeddings": 1024}
    ctx = context(tmp_path, stage(seq_len=32, steps=2, rope=rope), dict(tiny_models), corpus)
    distill.run(ctx)
    saved = AutoConfig.from_pretrained(ctx.out / "model")
    assert saved.max_position_embeddings == 1024
    assert saved.rope_parameters["rope_type"] == "yarn" and saved.rope_parameters["factor"] == 2.0
    assert saved.rope_parameters["rope_theta"] == AutoConfig.from_pretrained(tiny_models["student"]).rope_parameters["rope_theta"]


def test_control_and_bootstrap_train_from_scratch(tiny_models, corpus, tmp_path):
    st, inputs, _ = training_stage("control", tiny_models, steps=3)
    ctx = context(tmp_path / "control", st, inputs, corpus)
    assert control.run(ctx)["tokens_seen"] == 3 * 64
    assert AutoConfig.from_pretrained(ctx.out / "model").num_hidden_layers == 1
    assert AutoConfig.from_pretrained(ctx.out / "model").max_position_embeddings == st["config"]["seq_len"]
    st, inputs, _ = training_stage("bootstrap", tiny_models, steps=3)
    ctx = context(tmp_path / "boot", st, inputs, corpus)
    metrics = bootstrap.run(ctx)
    assert metrics["final_loss"] == metrics["final_loss"]  # finite, not NaN
    config = AutoConfig.from_pretrained(ctx.out / "model")
    assert config.model_type == "mistral" and config.tie_word_embeddings and config.vocab_size == 320
    assert config.max_position_embeddings == st["config"]["seq_len"]  # trained at, not built for (2,048)
    from cascadec.runtime.data.chat import DEFAULT_TEMPLATE  # a trained BPE has no template: the default is written

    assert AutoTokenizer.from_pretrained(ctx.out / "model").chat_template == DEFAULT_TEMPLATE


def test_lr_schedule_warms_up_then_decays_to_min():
    f = dict(warmup=2, total=10, min_ratio=0.1)
    assert [lr_factor(s, kind="constant", **f) for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, kind="cosine", **f) == 1.0 and lr_factor(10, kind="cosine", **f) == pytest.approx(0.1)
    assert lr_factor(6, kind="linear", **f) == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------
# Subprocess tests: kill -9 and resume; two processes under `accelerate launch`


def _ctx_json(tmp: Path, st: dict, inputs: dict, corpus: dict, cache: Path) -> Path:
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    raw = {"stage": st, "inputs": {k: str(v) for k, v in inputs.items()}, "data": {"corpus": corpus},
           "out": str(tmp / "out"), "scratch": str(tmp / "scratch"), "cache": str(cache), "result": str(tmp / "result.json")}
    (tmp / "ctx.json").write_text(json.dumps(raw))
    return tmp / "ctx.json"


STAGE_MAIN = ["-m", "cascadec.runtime.stage_main", "--ctx-json"]


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_gives_bit_identical_weights(tiny_models, corpus, tmp_path):
    st = stage(steps=120, checkpoint={"every_steps": 10, "keep": 2})
    reference = context(tmp_path / "ref", st, dict(tiny_models), corpus, cache=tmp_path / "cache")
    distill.run(reference)

    ctx_json = _ctx_json(tmp_path / "run", st, tiny_models, corpus, tmp_path / "cache")
    checkpoints = tmp_path / "run" / "scratch" / "checkpoints"
    proc = subprocess.Popen([PY, *STAGE_MAIN, str(ctx_json)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.12)  # land between checkpoints, not on one
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "result.json").exists(), "the run finished before it could be killed"
    killed_at = sorted(checkpoints.glob("step-*"))[-1].name

    subprocess.run([PY, *STAGE_MAIN, str(ctx_json)], check=True, capture_output=True)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["resumed_from_step"] == int(killed_at.split("-")[1]) > 0
    a, b = weights(reference.out), weights(tmp_path / "run" / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(reference.out) == losses(tmp_path / "run" / "out")


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_models, corpus, tmp_path):
    """Same global batch of 4: one process accumulates 4 micro-batches, two processes 2 each.

    Tolerance: losses within 1e-4 relative and weights within 1e-5 absolute; the only difference
    is the summation order of the gradient all-reduce.
    """
    st = stage(micro_batch=1)
    one = context(tmp_path / "one", st, dict(tiny_models), corpus, cache=tmp_path / "cache")
    distill.run(one)
    # through the executor's own spawn path: the command `cascadec run` uses for such a stage
    two_stage = {**st, "launch": {"devices": 2, "nodes": 1, "launcher": "accelerate", "strategy": "ddp"}}
    two = context(tmp_path / "two", two_stage, dict(tiny_models), corpus, cache=tmp_path / "cache")
    two.scratch.mkdir(parents=True)
    lines = []
    two.log = lines.append
    assert executor.needs_launcher(two_stage)
    assert executor._spawn(two)["processes"] == 2, "\n".join(lines[-40:])
    (tmp_path / "two" / "result.json").write_text((two.scratch / "result.json").read_text())
    assert json.loads((tmp_path / "two" / "result.json").read_text())["processes"] == 2
    assert losses(tmp_path / "two" / "out") == pytest.approx(losses(one.out), rel=1e-4)
    a, b = weights(one.out), weights(tmp_path / "two" / "out")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


# Stop on request (SIGUSR1 before a Slurm time limit): step checkpoint, stop, resume equal


def test_a_stop_file_checkpoints_stops_and_the_rerun_resumes_equal(tiny_models, corpus, tmp_path):
    from cascadec.runtime import preempt

    reference = context(tmp_path / "ref", stage(), dict(tiny_models), corpus, cache=tmp_path / "cache")
    distill.run(reference)
    ctx = context(tmp_path / "run", stage(checkpoint={"every_steps": 4, "keep": 2}), dict(tiny_models), corpus,
                  cache=tmp_path / "cache")
    ctx.scratch.mkdir(parents=True)
    (ctx.scratch / preempt.STOP_FILE).write_text("")  # as the executor leaves it on SIGUSR1
    with pytest.raises(preempt.Preempted, match="after its step checkpoint of step 1$"):
        distill.run(ctx)
    assert sorted(p.name for p in (ctx.scratch / "checkpoints").iterdir()) == ["step-00000001"]  # not a due step
    preempt.clear(ctx.scratch)
    assert distill.run(ctx)["resumed_from_step"] == 1
    a, b = weights(reference.out), weights(ctx.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(reference.out) == losses(ctx.out)


@pytest.mark.slow
def test_sigusr1_to_a_launched_stage_writes_a_checkpoint_and_reports_the_step(tiny_models, corpus, tmp_path):
    st = stage(steps=120, checkpoint={"every_steps": 1000, "keep": 2})
    ctx_json = _ctx_json(tmp_path / "run", st, tiny_models, corpus, tmp_path / "cache")
    metrics = tmp_path / "run" / "scratch" / "metrics.jsonl"
    proc = subprocess.Popen([PY, *STAGE_MAIN, str(ctx_json)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    step = json.loads((tmp_path / "run" / "result.json").read_text())["preempted_at_step"]
    assert 2 <= step < 120
    assert [p.name for p in (tmp_path / "run" / "scratch" / "checkpoints").iterdir()] == [f"step-{step:08d}"]
