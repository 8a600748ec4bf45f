"""`eval` stage: held-out next-token loss of every checkpoint of one model or child, at one
context length or several (`config.contexts`: the same first held-out tokens cut into sequences
of each length; a length beyond a checkpoint's `trained_context` is scored and marked).

All checkpoints of a family share the root's tokenizer (pruning copies it), so every figure
is the mean cross-entropy over the very same held-out tokens and the numbers compare directly.

On the device, in the plan's precision, without full logits: each process (``launch.devices``
of them, started by the executor like a training stage) loads the checkpoint in the plan's
dtype, runs the decoder over its share of the packed sequences (sequence i goes to process
i mod world), and applies the LM head in chunks of ``chunk_tokens`` rows (`training/kd.py:
nll_sum`); the summed loss and token counts are added over processes. The result does not
depend on the number of processes beyond float summation order.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import transformers as tf

from ..context import StageContext
from ..data.stream import MixStream, Window, stage_stream
from ..evaluation import harness
from ..training.kd import nll_sum
from ..training.models import load_model
from ..training.train import decoder_hidden, next_token_labels, on_cpu

ROLE = "checkpoint:"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HARNESS_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@torch.no_grad()
def heldout_loss(model, stream, tokens: int, seq_len: int, *, batch: int = 8, chunk_tokens: int = 1024,
                 rank: int = 0, world: int = 1, device=None, reduce=None) -> tuple[float, int]:
    """Mean next-token cross-entropy over the first ``tokens // seq_len`` packed sequences.

    Returns (loss in nats per predicted token, predicted tokens), summed over all processes
    through ``reduce`` (a sum over processes; None for one process). Every sequence contributes
    ``seq_len - 1`` predictions; nothing is padded.
    """
    device = device or next(model.parameters()).device
    head = model.get_output_embeddings().weight
    window = Window(seq_len=seq_len, global_batch=1, steps=tokens // seq_len)  # the first sequences (a mix: by weight)
    mine = list(range(rank, tokens // seq_len, world))
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for first in range(0, len(mine), batch):
        ids = torch.stack([stream.sequence(window, i) for i in mine[first:first + batch]]).to(device)
        loss, n = nll_sum(decoder_hidden(model, ids), head, next_token_labels(ids), chunk_tokens)
        total += loss.double()
        count += n
    if reduce is not None:
        total, count = reduce(total), reduce(count)
    return total.item() / max(count.item(), 1), int(count.item())


def run(ctx: StageContext) -> dict:
    from accelerate import PartialState

    cfg = ctx.config
    precision = cfg.get("precision", "fp32")
    state = PartialState(cpu=on_cpu())
    reduce = (lambda t: _sum(t, state)) if state.num_processes > 1 else None
    harness_cfg = cfg.get("harness")
    include = _harness_tasks(ctx, harness_cfg, state) if harness_cfg else []
    index = harness.task_index(include) if harness_cfg and harness.needs_harness(harness_cfg["tasks"]) else None
    contexts = cfg.get("contexts") or [{"seq_len": cfg["seq_len"], "tokens": cfg["tokens"], "micro_batch": cfg.get("micro_batch")}]
    trained = cfg.get("trained_context") or {}
    results = {}
    for name in cfg["checkpoints"]:
        path = ctx.inputs[ROLE + name]
        started = time.time()
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        with state.main_process_first():  # without a tokenize stage the main process tokenises first
            stream = stage_stream(ctx, tokenizer, path, cfg["tokens"])
        model = load_model(path, dtype=DTYPES[precision]).to(state.device).eval()
        scores = {}
        for c in contexts:  # the same first tokens of the stream, cut at each length
            loss, count = heldout_loss(model, _at(stream, c), c["tokens"], c["seq_len"],
                                       batch=int(c.get("micro_batch") or 8),
                                       chunk_tokens=int(cfg.get("chunk_tokens") or 1024),
                                       rank=state.process_index, world=state.num_processes,
                                       device=state.device, reduce=reduce)
            scores[str(c["seq_len"])] = {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4), "tokens": count}
            if len(contexts) > 1:  # a length the checkpoint never trained at is scored, and marked
                scores[str(c["seq_len"])]["beyond_trained"] = trained.get(name) is not None and c["seq_len"] > trained[name]
        params = sum(p.numel() for p in model.parameters())
        first = scores[str(contexts[0]["seq_len"])]
        results[name] = {"loss": first["loss"], "perplexity": first["perplexity"], "tokens": first["tokens"], "params": params}
        if len(contexts) > 1:
            results[name].update(contexts=scores, trained_context=trained.get(name))
        del model  # before the harness loads the checkpoint itself
        if harness_cfg:
            tasks = [t for t in harness_cfg["tasks"] if "checkpoints" not in t or name in t["checkpoints"]]
            results[name]["harness"] = harness.run(
                path, tasks, include=include, dtype=HARNESS_DTYPES[precision],
                device=str(state.device), batch_size=int(harness_cfg.get("batch_size") or 8), log=ctx.log,
                index=index)
        at = ", ".join(f"{n}: {v['loss']:.4f}" for n, v in scores.items())
        ctx.log(f"eval {name}: loss {first['loss']:.4f} (ppl {first['perplexity']:.2f}) on {first['tokens']:,} tokens"
                f"{f' (by context {at})' if len(contexts) > 1 else ''}, {precision} "
                f"on {state.num_processes} x {state.device.type}, {time.time() - started:.1f}s")
    if state.is_main_process:
        summary = {"checkpoints": results, "precision": precision, "processes": state.num_processes,
                   "device": state.device.type}
        (ctx.out / "eval.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    metrics = {"checkpoints": {k: v["loss"] for k, v in results.items()}}
    if len(contexts) > 1:
        metrics["contexts"] = {k: {n: s["loss"] for n, s in v["contexts"].items()} for k, v in results.items()}
    if harness_cfg:
        metrics["harness"] = {k: v["harness"] for k, v in results.items()}
    return metrics


def _at(stream, context: dict):
    """The stream one context reads: a mix's per-source windows depend on the sequence length."""
    if isinstance(stream, MixStream) and context.get("sources"):
        return MixStream(stream.streams, stream.weights, context["sources"])
    return stream


def _harness_tasks(ctx: StageContext, cfg: dict, state) -> list:
    """Folders the harness searches for tasks: the generated tasks' (written by the main process
    into scratch) and those holding the files of each `include` data source."""
    out = ctx.scratch / "harness-tasks"
    with state.main_process_first():
        if state.is_main_process:
            for task in cfg["tasks"]:
                if "generate" in task:
                    harness.generate(task, ctx.data[task["data"]], out)
    dirs = [out]
    for name in cfg.get("include") or []:
        dirs += sorted({Path(p).parent for p in ctx.data[name]["paths"]} - set(dirs))
    return dirs


def _sum(t: torch.Tensor, state) -> torch.Tensor:
    """Sum over processes, in float64 (both gloo and NCCL reduce it)."""
    import torch.distributed as dist

    buf = t.to(torch.float64).clone()
    dist.all_reduce(buf)
    return buf
