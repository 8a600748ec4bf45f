"""What every training loop shares: `train.py` (distill, control, bootstrap, sft), dpo and odpo.

Owns the processes and precision, the optimiser and its schedule, step checkpoints and resume,
stopping on request, the metrics file and the final save. It must not choose models, data or
losses: the loops do, and call these pieces in the same order (see `train.train`).

A step checkpoint is `accelerator.save_state` (model, optimiser, RNG and every object registered
for checkpointing: the scheduler and the loop's position) written to
``scratch/checkpoints/.tmp-step-N`` and renamed to ``step-N`` only when complete, so the newest
``step-*`` is always loadable. Under fsdp the model and optimiser are DCP shards and the rest a
file per rank (`fsdp.save_state`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import preempt
from ..context import StageContext
from ..data.stream import copy_tokenizer_files
from ..progress import Progress
from . import fsdp

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def on_cpu() -> bool:
    """Without CUDA, processes started by `accelerate launch` must join a gloo group on the CPU
    (Accelerate only does so when told ``cpu=True``; otherwise each would run alone)."""
    return not torch.cuda.is_available()


def mixed_precision(precision: str) -> str:
    """Accelerate's ``mixed_precision`` for the plan's precision on this machine (fp32 on CPU)."""
    if precision in ("bf16", "fp16") and torch.cuda.is_available():
        if precision == "fp16" or torch.cuda.is_bf16_supported():
            return precision
    return "no"


def save_dtype(precision: str) -> torch.dtype:
    """Trained checkpoints are written in the plan's precision (bf16 runs give bf16 weights, as the
    checkpoints they start from), whatever the machine computed in."""
    return SAVE_DTYPES.get(precision or "fp32", torch.float32)


def accelerator(ctx: StageContext, mixed: str) -> Accelerator:
    """The stage's Accelerator: gloo on CPU, ``mixed`` autocast, TensorBoard when installed."""
    return Accelerator(cpu=on_cpu(), mixed_precision=mixed,
                       log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
                       project_dir=str(log_dir(ctx)))


def log_dir(ctx: StageContext) -> Path:
    """TensorBoard's folder: `WORKDIR/logs/<stage id>/`, which outlives the stage's scratch (removed
    when the stage succeeds) and is not one of its hashed outputs; scratch when there is no workspace."""
    if ctx.workdir is None:
        return Path(ctx.scratch)
    return Path(ctx.workdir) / "logs" / str(ctx.stage.get("id", "stage"))


def lr_factor(step: int, *, kind: str, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): linear warmup, then the decay ``kind``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; expected cosine, linear or constant")


def make_optimizer(model, opt_cfg: dict, sched_cfg: dict, steps: int):
    """AdamW (no weight decay on norms and biases) and its LambdaLR schedule."""
    lr, decay = float(opt_cfg.get("lr", 3e-4)), float(opt_cfg.get("weight_decay", 0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
                                  eps=float(opt_cfg.get("eps", 1e-8)))
    shape = dict(kind=sched_cfg.get("kind", "cosine"), warmup=int(sched_cfg.get("warmup_steps", 0)), total=steps,
                 min_ratio=float(opt_cfg.get("min_lr", 0.0)) / lr if lr else 0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **shape))


def clip(accelerator, objective, grad_clip, sharded: bool = False) -> float | None:
    """Clip the gradient norm to ``grad_clip`` (None: no clipping); the norm before clipping."""
    if not grad_clip:
        return None
    if sharded:
        return fsdp.clip(objective, float(grad_clip))
    return float(accelerator.clip_grad_norm_(objective.parameters(), float(grad_clip)))


def due(step: int, steps: int, ckpt_cfg: dict) -> bool:
    """Whether a step checkpoint is due after ``step`` (never after the last: the final save follows)."""
    every = int(ckpt_cfg.get("every_steps") or 0)
    return every > 0 and step % every == 0 and step < steps


def agreed(accelerator, asked: bool) -> bool:
    """True on every rank when any rank was asked to stop: all must checkpoint the same step."""
    if accelerator.num_processes == 1:
        return asked
    flag = torch.tensor(float(asked), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def checkpoint_dir(ctx: StageContext, accelerator) -> Path:
    """``scratch/checkpoints`` without half-written saves (the executor empties scratch when the
    stage's hash changes, so every checkpoint here belongs to this configuration)."""
    path = Path(ctx.scratch) / "checkpoints"
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".tmp-step-*"):
            shutil.rmtree(stale)  # a save interrupted by a kill
    accelerator.wait_for_everyone()
    return path


def latest(checkpoints: Path) -> Path | None:
    done = sorted(checkpoints.glob("step-*"))
    return done[-1] if done else None


def save_checkpoint(accelerator, checkpoints: Path, step: int, keep: int, sharded_state=None) -> None:
    """``sharded_state``: (model, optimizer, extras) of an fsdp stage, saved with DCP."""
    tmp, final = checkpoints / f".tmp-step-{step:08d}", checkpoints / f"step-{step:08d}"
    if sharded_state is not None:
        fsdp.save_state(tmp, *sharded_state)
    else:
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)  # atomic: only complete checkpoints carry the step-* name
        for old in sorted(checkpoints.glob("step-*"))[:-max(keep, 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def open_metrics(ctx: StageContext, step: int, accelerator) -> Path:
    """The JSONL of per-step metrics, cut back to ``step`` so a resumed run does not repeat lines."""
    path = Path(ctx.metrics_file or Path(ctx.scratch) / "metrics.jsonl")
    if accelerator.is_main_process:
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))
    return path


def log_metrics(accelerator, path: Path, record: dict) -> None:
    """One line of ``path`` (main process) and the trackers' scalars (numbers only)."""
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                    step=record["step"])
    if accelerator.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def tracker_name(ctx: StageContext) -> str:
    return str(ctx.stage.get("id", "stage")).replace("/", "_")


def finish_trackers(accelerator) -> None:
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group
        tracker.finish()


def save_final(ctx: StageContext, accelerator, model, dtype: torch.dtype, tokenizer, tokenizer_dir: Path,
               metrics: Path, *, chat_template: bool = False) -> None:
    """``ctx.out/model`` (``model``, unwrapped, in ``dtype``: loadable by `from_pretrained`; None
    when the weights are written already, as fsdp does) with the tokenizer files copied byte for
    byte, and ``ctx.out/metrics.jsonl``; written by the main process. ``chat_template``:
    post-training stages also write the default chat template when the tokenizer has none, so the
    model renders conversations as it was trained on them."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(ctx.out) / "model"
        if model is not None:
            model.to(dtype).save_pretrained(out, safe_serialization=True)
        if not copy_tokenizer_files(tokenizer_dir, out):
            tokenizer.save_pretrained(out)
        if chat_template:  # the template file, when there is one, was copied with the tokenizer
            from ..data.chat import ensure_template

            ensure_template(out)
        shutil.copyfile(metrics, Path(ctx.out) / "metrics.jsonl")
    accelerator.wait_for_everyone()


class StepState:
    """The optimiser steps done, plus what a loop must carry across a resume (``extra``: numbers
    such as odpo's starting win rate); saved with every step checkpoint (Accelerate custom state)."""

    def __init__(self, **extra):
        self.step = 0
        self.extra = dict(extra)

    def state_dict(self) -> dict:
        return {"step": self.step, **self.extra}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.step = int(state.pop("step"))
        self.extra.update(state)


def run_steps(ctx: StageContext, accelerator, objective, optimizer, scheduler, state: StepState, total: int,
              one_step, *, before=None, after=None) -> dict:
    """The step loop of the preference stages (dpo, odpo), with resume, checkpoints and metrics.

    Registers ``scheduler`` and ``state`` for checkpointing, resumes from the newest step
    checkpoint, then for each remaining step calls ``one_step(step) -> (record, postfix)`` (the
    forward and backward passes of optimiser step ``step``, 0-based; its metrics, and what the
    progress line shows), clips, steps the optimiser and schedule, calls ``after(steps_done)``
    (metrics measured on the updated model, merged into the record), logs, and checkpoints when due
    or asked to stop. ``before(start_step)`` runs once after the resume; a dict it returns is
    logged as the record of ``start_step``. Returns the start step, the wall time, the last
    record and the metrics file.
    """
    config = ctx.config
    ckpt_cfg, grad_clip = config.get("checkpoint") or {}, (config.get("optimizer") or {}).get("grad_clip")
    sharded = fsdp.is_sharded(objective)  # DCP shards instead of Accelerate's save_state (fsdp.py)
    if not sharded:
        accelerator.register_for_checkpointing(scheduler, state)
    checkpoints = checkpoint_dir(ctx, accelerator)
    resumed = latest(checkpoints)
    if resumed and sharded:
        extra = fsdp.load_state(resumed, objective, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        state.load_state_dict(extra["state"])
    elif resumed:
        accelerator.load_state(str(resumed))
    if resumed:
        ctx.log(f"resumed from {resumed.name}: step {state.step}")
    metrics = open_metrics(ctx, state.step, accelerator)
    accelerator.init_trackers(tracker_name(ctx))
    start, started = state.step, time.perf_counter()
    if before is not None and (first := before(start)):
        log_metrics(accelerator, metrics, {"step": start, **first})
    bar = Progress(total, initial=start, what=str(ctx.stage.get("id", "train")), log=ctx.log,
                   enabled=accelerator.is_main_process)
    record: dict = {}
    for step in range(start, total):
        record, postfix = one_step(step)
        grad_norm = clip(accelerator, objective, grad_clip, sharded)
        step_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step + 1
        record = {"step": state.step, **record, "lr": step_lr, "grad_norm": grad_norm,
                  **(after(state.step) if after is not None else {})}
        log_metrics(accelerator, metrics, record)
        bar.update(1, **postfix)
        stop = state.step < total and agreed(accelerator, preempt.requested(ctx.scratch))
        if stop or due(state.step, total, ckpt_cfg):
            extras = {"scheduler": scheduler.state_dict(), "state": state.state_dict()}
            save_checkpoint(accelerator, checkpoints, state.step, int(ckpt_cfg.get("keep", 2)),
                            (objective, optimizer, extras) if sharded else None)
        if stop:  # SIGUSR1 before a Slurm time limit: the requeued job resumes here (runtime/preempt.py)
            raise preempt.Preempted(state.step)
    bar.close()
    finish_trackers(accelerator)
    accelerator.wait_for_everyone()
    return {"start": start, "wall": time.perf_counter() - started, "record": record, "metrics": metrics}
