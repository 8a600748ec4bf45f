"""The `teacher-logits` stage: run the teacher once over a data window, keep its top-k logits.

Owns the writing side of `topk_cache.py`'s format: top-k logits, and the log-sum-exp outside the
top-k at every temperature the cache's readers distill at (``config.temperatures``: the compiler
writes them into the plan, so they are part of the stage's hash).
Shards are written to scratch first (one per block of sequences, atomically) so a killed run
keeps finished blocks, and moved into the output when all processes are done. Process r of P
takes blocks r, r+P, r+2P, ...

Over a chat source the sequences are the packed rows the sft stages read (`data/packing.py`: the
same packing of the same shards at the same ``seq_len``), the teacher sees each conversation alone
(restarting position ids), and the cache holds the first ``min(rows, tokens / seq_len)`` rows: one
teacher pass serves every child's sft.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers import AutoTokenizer

from ..context import StageContext
from ..data.packing import PackedRows
from ..data.shards import Shards, is_chat
from ..data.stream import Window, stage_stream, tokenizer_fingerprint
from ..training.models import load_model
from ..training.topk_cache import FORMAT, INDEX, ids_digest, value_dtype
from ..training.train import decoder_hidden, mixed_precision, on_cpu

BLOCK = 64  # sequences per shard
CHUNK_TOKENS = 1024  # tokens per head matmul: the full [tokens x vocab] logits never exist


def run(ctx: StageContext) -> dict:
    config, state, started = ctx.config, PartialState(cpu=on_cpu()), time.perf_counter()
    seq_len, tokens, k = int(config["seq_len"]), int(config["tokens"]), int(config["top_k"])
    if tokens % seq_len:
        raise ValueError(f"tokens {tokens} is not a whole number of {seq_len}-token sequences")
    sequences = tokens // seq_len
    if not config.get("temperatures"):
        raise ValueError("the plan's teacher-logits config lists no `temperatures` (a plan from an older "
                         "cascadec); re-plan with `cascadec plan SPEC -o PLAN`")
    temperatures = sorted({float(t) for t in config["temperatures"]})
    window = Window(seq_len=seq_len, global_batch=1, steps=sequences, offset=int(config["data"].get("offset") or 0))
    teacher_dir = ctx.inputs["teacher"]
    bf16 = mixed_precision(config.get("precision", "fp32")) == "bf16"
    teacher = load_model(teacher_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    teacher.eval().requires_grad_(False).to(state.device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    with state.main_process_first():
        stream = stage_stream(ctx, tokenizer, teacher_dir, None if _chat(ctx) else window.offset + tokens)
    packed = None
    if stream.shards.chat:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        packed = PackedRows(stream.shards, seq_len, offset=window.offset, pad_id=pad)
        sequences = min(packed.rows, sequences)
        ctx.log(f"teacher-logits: {packed.examples:,} conversations in {packed.rows:,} packed rows; caching {sequences:,}")

    shards = Path(ctx.scratch) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    dtype, micro = value_dtype(config.get("precision", "fp32")), int(config.get("micro_batch") or 1)
    blocks = range(0, sequences, BLOCK)
    for b in blocks[state.process_index :: state.num_processes]:
        path = shards / f"shard-{b:09d}.safetensors"
        if path.exists():
            continue
        block = list(range(b, min(b + BLOCK, sequences)))
        if packed is not None:
            rows = packed.batch(block)
            ids, positions = rows.input_ids, rows.position_ids
        else:
            ids, positions = torch.stack([stream.sequence(window, i) for i in block]), None
        values, indices, rest = top_k_logits(teacher, ids, k, micro, state.device, temperatures, positions)
        tmp = path.with_suffix(".tmp")
        save_file({"values": values.to(dtype).contiguous(), "indices": indices, "lse_rest": rest}, str(tmp))
        os.replace(tmp, path)
        ctx.log(f"teacher-logits: sequences {b}..{b + len(ids) - 1} of {sequences}")

    state.wait_for_everyone()
    if state.is_main_process:
        index = {"format": FORMAT, "stage": ctx.stage.get("id"),
                 "vocab": teacher.get_output_embeddings().weight.shape[0], "top_k": k, "seq_len": seq_len,
                 "offset": window.offset, "sequences": sequences, "tokens": sequences * seq_len, "dtype": str(dtype),
                 "temperatures": temperatures, "teacher": str(teacher_dir),
                 "tokenizer_sha256": tokenizer_fingerprint(teacher_dir),
                 "packed": packed is not None, "shards": [],
                 "ids_sha256": packed.ids_sha256(sequences) if packed is not None
                 else ids_digest(stream, window.offset, window.offset + tokens)}
        out = _out_dir(ctx)
        for b in blocks:
            name = f"shard-{b:09d}.safetensors"
            shutil.move(shards / name, out / name)
            index["shards"].append({"file": name, "first": b, "count": min(BLOCK, sequences - b)})
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    state.wait_for_everyone()
    return {"tokens": sequences * seq_len, "tokens_seen": sequences * seq_len, "sequences": sequences, "top_k": k,
            "wall_s": round(time.perf_counter() - started, 3)}


@torch.no_grad()
def top_k_logits(teacher, ids: torch.Tensor, k: int, micro: int, device, temperatures: list[float],
                 position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k raw logits and int32 ids, [sequences, seq_len, k], chunked through the LM head, and
    the fp32 log-sum-exp of logits / τ outside the top-k, [sequences, seq_len, len(temperatures)].
    ``position_ids`` (packed rows) restart per conversation: each is attended to alone."""
    head = teacher.get_output_embeddings().weight
    values, indices, rests = [], [], []
    positions = position_ids.split(micro) if position_ids is not None else [None] * len(ids.split(micro))
    for batch, pos in zip(ids.split(micro), positions):
        hidden = decoder_hidden(teacher, batch.to(device), pos.to(device) if pos is not None else None)
        flat = hidden.reshape(-1, hidden.shape[-1])
        for h in flat.split(CHUNK_TOKENS):
            logits = (h @ head.T).float()
            top = logits.topk(k, dim=-1)
            off = logits.scatter_(-1, top.indices, float("-inf"))  # in place: the top-k are copied out
            rests.append(torch.stack([torch.logsumexp(off / t, dim=-1) for t in temperatures], -1).cpu())
            values.append(top.values.cpu())
            indices.append(top.indices.int().cpu())
            del logits, off
    shape = (ids.shape[0], ids.shape[1], k)
    return (torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape),
            torch.cat(rests).reshape(*shape[:2], len(temperatures)))


def _chat(ctx: StageContext) -> bool:
    """The stage reads a chat source (packed rows, any length): its tokenize stage's shards say so,
    or without one its data source's format."""
    if "tokens" in ctx.inputs:
        return Shards(ctx.inputs["tokens"]).chat
    return is_chat(ctx.source())


def _out_dir(ctx: StageContext) -> Path:
    """Where the cache goes: the output the plan declares (`stages/<id>/logits`, which the executor
    checks for), or the stage's out folder itself for a stage dict that declares none."""
    outputs = ctx.stage.get("outputs") or []
    out = Path(ctx.out) / Path(outputs[0]).name if outputs else Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    return out
