"""Building stage dicts and contexts for runtime tests (CPU, tiny shapes): distill stages, and the
on-policy stages (odpo, grpo) that read a `prompts` source; their metrics and saved weights."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from safetensors.torch import load_file

from cascadec.runtime.context import StageContext

DISTILL = {
    "id": "distill/tiny/short",
    "kind": "distill",
    "hash": "test",
    "config": {
        "phase": "short", "seq_len": 16, "global_batch": 4, "micro_batch": 2, "steps": 6, "tokens": 384,
        "data": {"name": "corpus", "offset": 8},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "top_k": None, "ce_weight": 0.0, "chunk_tokens": 24},
        "optimizer": {"name": "adamw", "lr": 3e-3, "min_lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "rope": None, "checkpoint": {"every_steps": 2, "keep": 2}, "seed": 0, "precision": "fp32",
    },
}


def stage(base: dict = DISTILL, **config) -> dict:
    out = copy.deepcopy(base)
    for key, value in config.items():
        out["config"][key] = value
    out["config"]["tokens"] = out["config"]["steps"] * out["config"]["seq_len"] * out["config"]["global_batch"]
    return out


def context(tmp: Path, stage_dict: dict, inputs: dict, corpus: dict, cache: Path | None = None) -> StageContext:
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    return StageContext(stage=stage_dict, inputs=inputs, data={"corpus": corpus}, out=tmp / "out",
                        scratch=tmp / "scratch", cache=cache or tmp / "cache", log=lambda msg: None)


def teacher_logits_stage(distill_stage: dict, top_k: int, **config) -> dict:
    """The teacher-logits stage that serves ``distill_stage``'s window."""
    cfg = distill_stage["config"]
    return {"id": "teacher-logits/tiny", "kind": "teacher-logits", "config": {
        "seq_len": cfg["seq_len"], "tokens": cfg["tokens"], "data": cfg["data"], "top_k": top_k,
        "micro_batch": cfg["micro_batch"], "precision": "fp32",
        "temperatures": [cfg["loss"]["temperature"]], **config}}


def kill_then_resume(ctx_json: Path, ready) -> tuple[int, dict]:
    """Run a stage (`stage_main --ctx-json`) in a subprocess, SIGKILL it once ``ready()`` is true
    (or it is about to, the caller's wait), rerun it to the end; return (the step of the newest
    checkpoint at the kill, the rerun's result)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "cascadec.runtime.stage_main", "--ctx-json", str(ctx_json)]
    run = ctx_json.parent
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists(), "the run finished before it could be killed"
    killed_at = sorted((run / "scratch" / "checkpoints").glob("step-*"))[-1].name
    subprocess.run(command, check=True, capture_output=True)
    return int(killed_at.split("-")[1]), json.loads((run / "result.json").read_text())


def prompts_stage(base: dict, **config) -> dict:
    """An odpo/grpo stage dict: ``base`` with ``config`` set, and as many prompts as its steps read."""
    out = copy.deepcopy(base)
    out["config"].update(config)
    out["config"]["prompts"] = out["config"]["steps"] * out["config"]["global_batch"]
    return out


def prompts_context(tmp: Path, st: dict, policy: Path, prompts: dict) -> StageContext:
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    return StageContext(stage=st, inputs={"policy": policy}, data={"prompts": prompts}, out=tmp / "out",
                        scratch=tmp / "scratch", log=lambda msg: None)


def importable(monkeypatch, folder: Path) -> None:
    """Let the stage (and the processes it launches) import the test modules a plan names."""
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))
