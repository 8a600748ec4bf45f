"""The one training loop: distill, teacher-free control/bootstrap, and sft all call `train`.

Owns the optimiser, schedule, step checkpoints (resume), metrics and the final save. It must not
load models or choose data: stages do that and hand it a model, a tokenizer and a source.

The loop takes micro-batches of (input_ids, labels, position_ids) from a batch source: windows of
the token stream with next-token labels (`StreamBatches`: distill, control, bootstrap), or packed
chat conversations with labels on the trained tokens (`data/packing.py`: sft). Both split a step's
sequences over processes by (step, rank) alone, so resume and multi-process work the same way.

Loss scale under accumulation: a step's loss is the mean over *all* its trained tokens, across
micro-batches and processes (each micro-batch's mean is weighted by its share of the step's
trained tokens), not the mean of per-micro-batch means, which would weight a token of a short
conversation above one of a long one. When every micro-batch trains as many tokens (the stream)
the weight is exactly 1.

A step checkpoint is `accelerator.save_state` (model, optimiser, RNG) plus the scheduler and the
data position (under `strategy: fsdp`, DCP shards and per-rank state: `fsdp.py`), written to
``scratch/checkpoints/.tmp-step-N`` and renamed to ``step-N`` only when complete, so the newest
``step-*`` is always loadable. A run killed at any moment restarts from
it, reads the same tokens (sharding depends only on the step) and, on CPU with fixed seeds,
reaches bit-identical weights.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from .. import preempt
from ..context import StageContext
from ..progress import Progress
from . import fsdp
from ..data.packing import MicroBatch, PackedBatches
from ..data.stream import (DataPosition, MixStream, Window, copy_tokenizer_files, micro_batches, per_process,
                           source_tokens, stage_stream, tokenizer_fingerprint)
from .kd import IGNORE_INDEX, LossSpec, Teacher, chunked_loss
from .topk_cache import TopKCache, ids_digest


class Objective(torch.nn.Module):
    """The trained model plus its loss, as one module so DDP sees a single forward.

    The teacher is deliberately *not* a submodule: it is frozen, and would otherwise be written
    into every step checkpoint.
    """

    def __init__(self, model, spec: LossSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.parts: dict = {}  # the last forward's loss terms (kd, ce) for the metrics

    def forward(self, input_ids, labels, position_ids=None, **teacher):
        hidden = decoder_hidden(self.model, input_ids, position_ids)
        head = self.model.get_output_embeddings().weight
        self.parts = {}
        return chunked_loss(hidden, head, labels, self.spec, Teacher(**teacher) if teacher else None,
                            parts=self.parts if teacher else None)


class TeacherForward(torch.nn.Module):
    """The frozen teacher's final hidden states and LM-head weight for one micro-batch: one module,
    so that sharded, its root unit gathers the head for the loss (`fsdp.reshard` frees it after)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, input_ids, position_ids=None):
        return decoder_hidden(self.teacher, input_ids, position_ids), self.teacher.get_output_embeddings().weight


def decoder_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states, without the LM head: the loss applies the head in chunks.

    ``position_ids`` restarting inside a row (packed conversations) make transformers build a
    block-diagonal causal mask (no attention mask is passed, no cache is used; packing.py)."""
    return model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position of each packed sequence has no target."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


class StreamBatches:
    """The micro-batches of a token stream: windows of ``seq_len`` tokens, every next token a target."""

    packed = False

    def __init__(self, stream, window: Window):
        self.stream, self.window = stream, window

    def micro_batches(self, step: int, rank: int, world: int, micro: int):
        for input_ids, indices in micro_batches(self.stream, self.window, step, rank, world, micro):
            yield MicroBatch(input_ids, next_token_labels(input_ids), None, indices)

    @property
    def sequences(self) -> int:
        """Sequences (rows) a teacher-logits cache must hold for this stage."""
        return self.window.sequences

    def span(self, n: int) -> str:
        start = self.window.offset
        return f"ids [{start:,}, {start + n * self.window.seq_len:,})"

    def ids_sha256(self, n: int) -> str:
        return ids_digest(self.stream, self.window.offset, self.window.offset + n * self.window.seq_len)


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


def teacher_dtype(config: dict) -> torch.dtype:
    """The frozen teacher runs in bf16 where the stage trains in bf16 on a GPU, else fp32."""
    return torch.bfloat16 if mixed_precision(config.get("precision", "fp32")) == "bf16" else torch.float32


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def save_dtype(precision: str) -> torch.dtype:
    """Trained checkpoints are written in the plan's precision (bf16 runs give bf16 weights, as the
    checkpoints they start from), whatever the machine computed in."""
    return SAVE_DTYPES.get(precision or "fp32", torch.float32)


def train(ctx: StageContext, model, tokenizer, tokenizer_dir: Path, *, teacher=None, teacher_dir: Path | None = None,
          teacher_logits: Path | None = None) -> dict:
    """Train ``model`` over the stage's window; save it to ``ctx.out / "model"``; return metrics.

    The teacher is a model (``teacher``, loaded from ``teacher_dir``) or a top-k logits cache
    (``teacher_logits``); either way its tokenizer must be the student's, byte for byte, and a
    cache must have been built on exactly the token ids this stage reads.
    """
    config = ctx.config
    window = Window.from_config(config)
    spec = LossSpec.from_config(config.get("loss"))
    opt_cfg, sched_cfg = config.get("optimizer") or {}, config.get("schedule") or {}
    ckpt_cfg = config.get("checkpoint") or {}
    micro = int(config.get("micro_batch") or 1)
    strategy = fsdp.strategy(ctx.stage)
    if strategy == "deepspeed":
        raise ValueError("strategy deepspeed is not supported by this runtime (the compiler refuses it: CSC250); "
                         "use strategy fsdp")
    sharded = strategy == "fsdp"
    if sharded and config.get("precision") == "fp16":
        raise ValueError("precision fp16 is not supported with strategy fsdp (the compiler refuses it: CSC251); "
                         "use precision bf16")
    compute = mixed_precision(config.get("precision", "fp32"))

    # 1. Processes, precision, trackers; the data window is tokenised once (main process first).
    #    Under fsdp the mixed-precision policy of `fully_shard` casts, not Accelerate's autocast.
    accelerator = Accelerator(cpu=on_cpu(), mixed_precision="no" if sharded else compute,
                              log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
                              project_dir=str(log_dir(ctx)))
    own_group = sharded and fsdp.init_process_group(accelerator.device)
    set_seed(int(config.get("seed", 0)))
    accum = per_process(window.global_batch, accelerator.num_processes, micro) // micro
    placement = {}
    if teacher is not None:
        _check_vocab(teacher, model)
        if teacher_dir is not None:  # always a directory: the executor resolves hub ids to snapshots
            _check_tokenizers(f"teacher {teacher_dir}", tokenizer_fingerprint(teacher_dir), tokenizer_dir)
        teacher = TeacherForward(teacher.eval().requires_grad_(False))
        shard_teacher, why = fsdp.teacher_sharded(ctx.stage)
        if shard_teacher:
            fsdp.shard(teacher, accelerator.device)
        else:
            teacher.to(accelerator.device)
        if sharded:
            placement = {"teacher_placement": why, "teacher_params_per_rank": fsdp.gathered(fsdp.local_params(teacher))}
            ctx.log(f"distill: teacher {why}")
    cache = _teacher_logits(ctx, teacher_logits, model, spec, tokenizer_dir)
    with accelerator.main_process_first():
        data = _batches(ctx, tokenizer, tokenizer_dir, window, cache)
    if cache is not None:
        cache.check(seq_len=window.seq_len, offset=window.offset, sequences=data.sequences,
                    temperature=spec.temperature)
        cache.check_tokens(data)
    if data.packed:
        ctx.log(f"sft: {data.rows.examples:,} conversations packed into {data.rows.rows:,} rows of {window.seq_len} "
                f"({data.rows.tokens / (data.rows.rows * window.seq_len):.1%} filled, {data.rows.truncated} truncated); "
                f"{window.sequences:,} rows read = {data.order.epochs(window.sequences):.2f} epochs")

    # 2. Optimiser, schedule, and what a checkpoint holds besides model and optimiser.
    if config.get("activation_checkpointing"):  # recompute each layer in backward (docs/plan.md, Estimates)
        model.activation_checkpointing_enable()
    objective = Objective(model, spec).train()
    position = DataPosition(window)
    if sharded:  # one unit per decoder layer; the optimiser is built on the shards
        fsdp.shard(objective, accelerator.device, mp=fsdp.policy(compute))
        placement["student_params_per_rank"] = fsdp.gathered(fsdp.local_params(objective))
        optimizer, scheduler = _optimizer(objective.model, opt_cfg, sched_cfg, window.steps)
    else:
        optimizer, scheduler = _optimizer(model, opt_cfg, sched_cfg, window.steps)
        objective, optimizer = accelerator.prepare(objective, optimizer)
        accelerator.register_for_checkpointing(scheduler, position)

    # 3. Resume from the newest complete step checkpoint, if any.
    checkpoints = _checkpoint_dir(ctx, accelerator)
    resumed = _latest(checkpoints)
    if resumed and sharded:
        extra = fsdp.load_state(resumed, objective, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        position.load_state_dict(extra["position"])
    elif resumed:
        accelerator.load_state(str(resumed))
    if resumed:
        ctx.log(f"resumed from {resumed.name}: step {position.step}, {position.tokens:,} tokens")
    metrics_file = _metrics_file(ctx, position.step, accelerator)
    accelerator.init_trackers(_tracker_name(ctx))

    # 4. The loop.
    start, started = position.step, time.perf_counter()
    bar = Progress(window.steps, initial=start, what=str(ctx.stage.get("id", "train")), log=ctx.log,
                   enabled=accelerator.is_main_process)
    loss_value = float("nan")
    world = accelerator.num_processes
    for step in range(start, window.steps):
        total = torch.zeros((), device=accelerator.device)
        terms: dict[str, torch.Tensor] = {}
        batches = list(data.micro_batches(step, accelerator.process_index, world, micro))
        counts = [int((b.labels != IGNORE_INDEX).sum()) for b in batches]
        trained = _summed(accelerator, sum(counts))  # the step's trained tokens over all processes
        for m, batch in enumerate(batches):
            input_ids, labels = batch.input_ids.to(accelerator.device), batch.labels.to(accelerator.device)
            positions = batch.position_ids.to(accelerator.device) if batch.position_ids is not None else None
            sync = m == accum - 1
            no_sync = fsdp.gradient_sync(objective, sync) if sharded else (
                accelerator.no_sync(objective) if not sync else nullcontext())
            # this micro-batch's share of the step's trained tokens (exactly 1 when all shares are equal)
            weight = counts[m] * accum * world / trained if trained else 0.0
            with no_sync, accelerator.autocast():
                extra = _teacher_side(teacher, cache, input_ids, positions, batch.indices, spec, accelerator.device)
                loss = objective(input_ids, labels, positions, **extra)
                if weight != 1.0:
                    loss = loss * weight
                fsdp.reshard(teacher)  # the loss is done with the teacher's head (kd.py: gradients in forward)
                accelerator.backward(loss / accum)
            total += loss.detach() / accum
            for k, v in _unwrapped(accelerator, objective, sharded).parts.items():
                terms[k] = terms.get(k, 0.0) + v * weight / accum
        grad_norm = _clip(accelerator, objective, opt_cfg.get("grad_clip"), sharded)
        step_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        position.step = step + 1

        loss_value = accelerator.reduce(total, "mean").item()
        elapsed = time.perf_counter() - started
        rate = (position.step - start) * window.seq_len * window.global_batch / max(elapsed, 1e-9)
        record = {"step": position.step, "tokens": position.tokens, "loss": loss_value,
                  "lr": step_lr, "grad_norm": grad_norm, "tokens_per_s": rate}
        shown = {}
        if data.packed:  # sft: the loss terms, the share of trained tokens, the epochs read so far
            parts = {k: accelerator.reduce(v.reshape(()), "mean").item() for k, v in sorted(terms.items())}
            record.update(parts, trained_tokens=trained, trained_share=trained / (window.global_batch * window.seq_len),
                          epoch=data.order.epochs(position.step * window.global_batch))
            shown = {**{k: f"{v:.4f}" for k, v in parts.items()}, "trained": f"{record['trained_share']:.0%}",
                     "epoch": f"{record['epoch']:.2f}"}
        _log_metrics(accelerator, metrics_file, record)
        bar.update(1, loss=f"{loss_value:.4f}", **shown, tok_s=f"{rate:,.0f}")
        stop = position.step < window.steps and _agreed(accelerator, preempt.requested(ctx.scratch))
        if stop or _due(position.step, window.steps, ckpt_cfg):
            state = (objective, optimizer, {"scheduler": scheduler.state_dict(), "position": position.state_dict()})
            _save_checkpoint(accelerator, checkpoints, position.step, int(ckpt_cfg.get("keep", 2)),
                             state if sharded else None)
        if stop:  # SIGUSR1 before a Slurm time limit: the requeued job resumes here (runtime/preempt.py)
            raise preempt.Preempted(position.step)
    bar.close()
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group
        tracker.finish()

    # 5. The final model, loadable by `AutoModelForCausalLM.from_pretrained`, in the plan's precision.
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - started
    dtype = save_dtype(config.get("precision"))
    trained_context(model, config, window)
    if sharded:
        fsdp.save_pretrained(objective.model, Path(ctx.out) / "model", dtype)
    elif accelerator.is_main_process:
        trained = accelerator.unwrap_model(objective).model.to(dtype)
        trained.save_pretrained(Path(ctx.out) / "model", safe_serialization=True)
    if accelerator.is_main_process:
        if not copy_tokenizer_files(tokenizer_dir, Path(ctx.out) / "model"):
            tokenizer.save_pretrained(Path(ctx.out) / "model")
        shutil.copyfile(metrics_file, Path(ctx.out) / "metrics.jsonl")
    accelerator.wait_for_everyone()
    if own_group:
        torch.distributed.destroy_process_group()
    trained_tokens = (window.steps - start) * window.seq_len * window.global_batch
    per_source = {}
    if not data.packed and isinstance(data.stream, MixStream):  # what the processes read of each source (manifest)
        mine = source_tokens(data.stream, window, accelerator.process_index, accelerator.num_processes)
        per_source = {"source_tokens": {k: sum(c[k] for c in gather_object([mine])) for k in mine}}
    if data.packed:  # trained tokens from the metrics file: it holds every step, across resumes
        trained_all = sum(json.loads(line).get("trained_tokens", 0) for line in metrics_file.read_text().splitlines()) \
            if accelerator.is_main_process else 0
        per_source = {**data.summary(window), "trained_tokens": trained_all,
                      "trained_share": round(trained_all / max(window.tokens, 1), 6)}
    return {"steps": window.steps, "tokens": window.tokens, "tokens_seen": window.tokens, "final_loss": loss_value,
            "wall_s": round(wall, 3), "resumed_from_step": start, "processes": accelerator.num_processes,
            "tokens_per_s": round(trained_tokens / max(wall, 1e-9), 1), "strategy": strategy,
            "dtype": str(dtype).removeprefix("torch."), **placement, **per_source}


def trained_context(model, config: dict, window: Window) -> None:
    """State in the config the context the model was trained for: the plan's `rope` settings when
    the stage extends the context (applied at load, models.py), else the stage's `seq_len`. A
    harness or vLLM takes `max_position_embeddings` at its word and would otherwise evaluate
    windows the model never saw (a parent bootstrapped at 128 tokens must not claim 2,048)."""
    if not (config.get("rope") or {}).get("max_position_embeddings"):
        model.config.get_text_config().max_position_embeddings = window.seq_len


def log_dir(ctx: StageContext) -> Path:
    """TensorBoard's folder: `WORKDIR/logs/<stage id>/`, which outlives the stage's scratch (removed
    when the stage succeeds) and is not one of its hashed outputs; scratch when there is no workspace."""
    if ctx.workdir is None:
        return Path(ctx.scratch)
    return Path(ctx.workdir) / "logs" / str(ctx.stage.get("id", "stage"))


def _optimizer(model, opt_cfg: dict, sched_cfg: dict, steps: int):
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


def _check_vocab(teacher, student) -> None:
    t = teacher.get_output_embeddings().weight.shape[0]
    s = student.get_output_embeddings().weight.shape[0]
    if t != s:
        raise ValueError(f"teacher vocabulary has {t} entries but the student's has {s}; "
                         "logit distillation needs the same tokenizer")


def _check_tokenizers(teacher: str, teacher_sha: str, student_dir: Path) -> None:
    """Logit distillation compares distributions over token ids: the same ids must mean the same
    strings, so the tokenizer files must be identical, not only the vocabulary size."""
    student_sha = tokenizer_fingerprint(student_dir)
    if teacher_sha != student_sha:
        raise ValueError(
            f"{teacher} and student {student_dir} have different tokenizers (sha256 of the tokenizer files: "
            f"{teacher_sha[:12]} and {student_sha[:12]}); logit distillation needs the student to use the "
            "teacher's tokenizer")


def _batches(ctx: StageContext, tokenizer, tokenizer_dir: Path, window: Window, cache: TopKCache | None):
    """The stage's batch source: packed conversations for sft, stream windows otherwise. A stream
    is read as far as the window and the cache's rows (whose digest is checked) reach."""
    if ctx.stage.get("kind") == "sft":
        return PackedBatches.open(ctx, tokenizer, tokenizer_dir, window)
    need = window.offset + max(window.tokens, cache.index["sequences"] * window.seq_len if cache else 0)
    return StreamBatches(stage_stream(ctx, tokenizer, tokenizer_dir, need), window)


def _summed(accelerator, n: int) -> int:
    """``n`` summed over the processes."""
    if accelerator.num_processes == 1:
        return n
    return int(accelerator.reduce(torch.tensor(n, device=accelerator.device), "sum").item())


def _unwrapped(accelerator, objective, sharded: bool) -> Objective:
    return objective if sharded else accelerator.unwrap_model(objective)


def _teacher_logits(ctx: StageContext, path: Path | None, model, spec: LossSpec,
                    tokenizer_dir: Path) -> TopKCache | None:
    """The top-k cache, checked against the student (the window and tokens once the data is open)."""
    if path is None:
        return None
    builder = next((i.get("stage") for i in ctx.stage.get("inputs", []) if i.get("role") == "teacher_logits"), None)
    cache = TopKCache(path, stage=builder)
    cache.check_vocab(model.get_output_embeddings().weight.shape[0])
    if spec.top_k and spec.top_k != cache.top_k:
        raise ValueError(f"loss.top_k is {spec.top_k} but the cached teacher logits hold top-{cache.top_k}")
    _check_tokenizers(f"teacher {cache.index['teacher']} (logits cached at {path})", cache.tokenizer, tokenizer_dir)
    return cache


def _teacher_side(teacher, cache: TopKCache | None, input_ids, position_ids, indices, spec: LossSpec,
                  device) -> dict:
    """Keyword arguments of `Objective.forward` describing the teacher for one micro-batch."""
    if cache is not None:
        values, ids, rest = cache.read(indices, spec.temperature)
        return {"values": values.to(device), "indices": ids.to(device), "rest": rest.to(device)}
    if teacher is None:
        return {}
    with torch.no_grad():
        hidden, weight = teacher(input_ids, position_ids)
    return {"hidden": hidden, "weight": weight}


def _clip(accelerator, objective, grad_clip, sharded: bool) -> float | None:
    if not grad_clip:
        return None
    if sharded:
        return fsdp.clip(objective, float(grad_clip))
    return float(accelerator.clip_grad_norm_(objective.parameters(), float(grad_clip)))


def _due(step: int, steps: int, ckpt_cfg: dict) -> bool:
    every = int(ckpt_cfg.get("every_steps") or 0)
    return every > 0 and step % every == 0 and step < steps


def _agreed(accelerator, asked: bool) -> bool:
    """True on every rank when any rank was asked to stop: all must checkpoint the same step."""
    if accelerator.num_processes == 1:
        return asked
    flag = torch.tensor(float(asked), device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def _checkpoint_dir(ctx: StageContext, accelerator) -> Path:
    """``scratch/checkpoints`` without half-written saves (the executor empties scratch when the
    stage's hash changes, so every checkpoint here belongs to this configuration)."""
    path = Path(ctx.scratch) / "checkpoints"
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".tmp-step-*"):
            shutil.rmtree(stale)  # a save interrupted by a kill
    accelerator.wait_for_everyone()
    return path


def _latest(checkpoints: Path) -> Path | None:
    done = sorted(checkpoints.glob("step-*"))
    return done[-1] if done else None


def _save_checkpoint(accelerator, checkpoints: Path, step: int, keep: int, sharded_state=None) -> None:
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


def _metrics_file(ctx: StageContext, step: int, accelerator) -> Path:
    """The JSONL of per-step metrics, cut back to ``step`` so a resumed run does not repeat lines."""
    path = Path(ctx.metrics_file or Path(ctx.scratch) / "metrics.jsonl")
    if accelerator.is_main_process:
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))
    return path


def _log_metrics(accelerator, path: Path, record: dict) -> None:
    accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
    if accelerator.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _tracker_name(ctx: StageContext) -> str:
    return str(ctx.stage.get("id", "stage")).replace("/", "_")
