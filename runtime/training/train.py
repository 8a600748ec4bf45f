"""The one training loop: distill, teacher-free control/bootstrap, and sft all call `train`.

Owns the step of next-token, distillation and sft training. It must not load models or choose
data: stages do that and hand it a model, a tokenizer and a source. The pieces every training loop
shares (optimiser, schedule, step checkpoints, metrics, final save) are `loop.py`'s, also used by
the dpo and odpo stages.

The loop takes micro-batches of (input_ids, labels, position_ids) from a batch source: windows of
the token stream with next-token labels (`StreamBatches`: distill, control, bootstrap), or packed
chat conversations with labels on the trained tokens (`data/packing.py`: sft). Both split a step's
sequences over processes by (step, rank) alone, so resume and multi-process work the same way.

Loss scale under accumulation: a step's loss is the mean over *all* its trained tokens, across
micro-batches and processes (each micro-batch's mean is weighted by its share of the step's
trained tokens), not the mean of per-micro-batch means, which would weight a token of a short
conversation above one of a long one. When every micro-batch trains as many tokens (the stream)
the weight is exactly 1.

A step checkpoint holds the model, optimiser, RNG, the scheduler and the data position (under
`strategy: fsdp`, DCP shards and per-rank state: `fsdp.py`). A run killed at any moment restarts
from the newest, reads the same tokens (sharding depends only on the step) and, on CPU with
fixed seeds, reaches bit-identical weights.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator  # noqa: F401  (tests patch Accelerator.autocast through this module)
from accelerate.utils import gather_object, set_seed

from .. import preempt
from ..context import StageContext
from ..progress import Progress
from . import fsdp
from ..data.packing import MicroBatch, PackedBatches
from ..data.stream import (DataPosition, MixStream, Window, micro_batches, per_process,
                           source_tokens, stage_stream, tokenizer_fingerprint)
from .kd import IGNORE_INDEX, LossSpec, Teacher, chunked_loss
from .loop import (SAVE_DTYPES, accelerator as make_accelerator, agreed, checkpoint_dir, clip, due,  # noqa: F401
                   finish_trackers, latest, log_dir, log_metrics, lr_factor, make_optimizer, mixed_precision,
                   on_cpu, open_metrics, save_checkpoint, save_dtype, save_final, tracker_name)
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


def teacher_dtype(config: dict) -> torch.dtype:
    """The frozen teacher runs in bf16 where the stage trains in bf16 on a GPU, else fp32."""
    return torch.bfloat16 if mixed_precision(config.get("precision", "fp32")) == "bf16" else torch.float32


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
    accelerator = make_accelerator(ctx, "no" if sharded else compute)
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
        optimizer, scheduler = make_optimizer(objective.model, opt_cfg, sched_cfg, window.steps)
    else:
        optimizer, scheduler = make_optimizer(model, opt_cfg, sched_cfg, window.steps)
        objective, optimizer = accelerator.prepare(objective, optimizer)
        accelerator.register_for_checkpointing(scheduler, position)

    # 3. Resume from the newest complete step checkpoint, if any.
    checkpoints = checkpoint_dir(ctx, accelerator)
    resumed = latest(checkpoints)
    if resumed and sharded:
        extra = fsdp.load_state(resumed, objective, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        position.load_state_dict(extra["position"])
    elif resumed:
        accelerator.load_state(str(resumed))
    if resumed:
        ctx.log(f"resumed from {resumed.name}: step {position.step}, {position.tokens:,} tokens")
    metrics_file = open_metrics(ctx, position.step, accelerator)
    accelerator.init_trackers(tracker_name(ctx))

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
        grad_norm = clip(accelerator, objective, opt_cfg.get("grad_clip"), sharded)
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
        log_metrics(accelerator, metrics_file, record)
        bar.update(1, loss=f"{loss_value:.4f}", **shown, tok_s=f"{rate:,.0f}")
        stop = position.step < window.steps and agreed(accelerator, preempt.requested(ctx.scratch))
        if stop or due(position.step, window.steps, ckpt_cfg):
            state = (objective, optimizer, {"scheduler": scheduler.state_dict(), "position": position.state_dict()})
            save_checkpoint(accelerator, checkpoints, position.step, int(ckpt_cfg.get("keep", 2)),
                            state if sharded else None)
        if stop:  # SIGUSR1 before a Slurm time limit: the requeued job resumes here (runtime/preempt.py)
            raise preempt.Preempted(position.step)
    bar.close()
    finish_trackers(accelerator)

    # 5. The final model, loadable by `AutoModelForCausalLM.from_pretrained`, in the plan's precision.
    accelerator.wait_for_everyone()
    wall = time.perf_counter() - started
    dtype = save_dtype(config.get("precision"))
    trained_context(model, config, window)
    if sharded:  # gathered and streamed by rank 0; save_final adds the tokenizer and metrics
        fsdp.save_pretrained(objective.model, Path(ctx.out) / "model", dtype)
    save_final(ctx, accelerator, None if sharded else accelerator.unwrap_model(objective).model, dtype, tokenizer,
               tokenizer_dir, metrics_file)
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
