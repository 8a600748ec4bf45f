"""The `dpo` stage: offline DPO on preference records (`format: preference`), the reference being
the step's starting checkpoint.

Owns the pairs' reading and the reference log-probs cache. The loss is `training/preference.py`'s,
batching and the accumulated step `training/pairs.py`'s, optimiser, checkpoints and final save
`training/loop.py`'s.

The reference's log-probs of every pair are computed once, before the first step, by the loaded
starting model itself (the processes share the work, the main process writes the file), and
cached in scratch under a key of their content (the starting weights' bytes, the pairs' token
ids, the window): a resumed or re-run stage reads them, so no second model is held during
training and the reference never runs again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from ..context import StageContext
from ..data import chat
from ..data.readers import Skips, source_files
from ..training import loop, pairs

CACHE = "reference"  # scratch/<CACHE>/<key>.safetensors


def run(ctx: StageContext) -> dict:
    config = ctx.config

    # 1. Processes, the policy, the pairs (each side cut to seq_len).
    s = pairs.setup(ctx)
    accelerator, model = s.accelerator, s.model
    records, counts = read_pairs(ctx, s.tokenizer, s.seq_len)
    order = pairs.order(len(records), s.seed, bool(config["data"].get("shuffle", True)))
    ctx.log(f"dpo: {len(records):,} pairs from {config['data']['name']} ({counts['truncated']:,} cut to {s.seq_len} "
            f"tokens, {counts['dropped']:,} dropped: prompt ≥ seq_len), {s.steps} steps of {s.global_batch}")

    # 2. The reference's log-probs, once (cached in scratch), by the starting model before any update
    #    (under fsdp a sharded frozen copy, dropped once they are computed: ranks > 0 hold no policy yet).
    scorer = (lambda: pairs.frozen(ctx, s, None)) if s.sharded else (lambda: pairs.SequenceLogps(model))
    ref, cached = reference_logps(ctx, accelerator, scorer, records, pad_id=s.pad_id, micro=s.micro)

    # 3. Optimiser, schedule, the loop.
    objective, optimizer, scheduler = pairs.prepare(ctx, s)
    state = loop.StepState()

    def one_step(step: int):
        chosen = [order(g) for g in pairs.my_slots(step, s.global_batch, accelerator.process_index,
                                                   accelerator.num_processes)]
        micros = [pairs.Micro(a=[records[i][0] for i in chunk], b=[records[i][1] for i in chunk],
                              ref_a=ref[0][chunk].to(accelerator.device), ref_b=ref[1][chunk].to(accelerator.device))
                  for chunk in (chosen[k * s.micro:(k + 1) * s.micro] for k in range(s.accum))]
        parts = pairs.update(accelerator, objective, micros, beta=s.beta, weight=s.weight, pad_id=s.pad_id)
        record = pairs.summary(accelerator, parts, s.beta)
        record.update(pairs=(step + 1) * s.global_batch, tokens=(step + 1) * s.global_batch * s.seq_len)  # plan's count
        return record, {"loss": f"{record['loss']:.4f}", "margin": f"{record['margin']:.3f}",
                        "acc": f"{record['accuracy']:.2f}"}

    done = loop.run_steps(ctx, accelerator, objective, optimizer, scheduler, state, s.steps, one_step)

    # 4. The final model, in the plan's precision, with its tokenizer and chat template.
    dtype = pairs.save(ctx, s, objective, done["metrics"])
    last = done["record"]
    return {"steps": s.steps, "pairs": len(records), "pairs_seen": s.steps * s.global_batch,
            "epochs": round(order.epochs(s.steps * s.global_batch), 4), "final_loss": last.get("loss"),
            "final_margin": last.get("margin"), "final_accuracy": last.get("accuracy"),
            "reference_logps": "cached" if cached else "computed", "resumed_from_step": done["start"],
            "wall_s": round(done["wall"], 3), "processes": accelerator.num_processes,
            "dtype": str(dtype).removeprefix("torch."), **counts}


def read_pairs(ctx: StageContext, tokenizer, seq_len: int) -> tuple[list[tuple], dict]:
    """Every preference record of the stage's source as (chosen, rejected) Examples cut to ``seq_len``;
    a pair whose prompt alone fills the window is dropped (counted), as are records skipped under
    ``on_error: skip``."""
    source, skips = ctx.source(), Skips()
    out, truncated, dropped = [], 0, 0
    for _, path in source_files(source):
        for pair in chat.examples(path, source, tokenizer, skips):
            a, b = pairs.truncate(pair.chosen, seq_len), pairs.truncate(pair.rejected, seq_len)
            if a is None or b is None:
                dropped += 1
                continue
            truncated += len(pair.chosen.ids) > seq_len or len(pair.rejected.ids) > seq_len
            out.append((a, b))
    if not out:
        raise ValueError(f"data {ctx.config['data']['name']!r} holds no preference pair that fits seq_len "
                         f"{seq_len} ({dropped} dropped, {skips.total} skipped)")
    return out, {"truncated": truncated, "dropped": dropped, "skipped": skips.total}


def cache_key(policy_dir: Path, records: list[tuple], seq_len: int) -> str:
    """sha256 of the starting weights' bytes and every pair's ids and mask."""
    h = hashlib.sha256(f"seq_len={seq_len}\0".encode())
    for name in sorted(p.name for p in Path(policy_dir).glob("*.safetensors")):
        h.update(name.encode() + b"\0")
        with (Path(policy_dir) / name).open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    for a, b in records:
        h.update(json.dumps([a.ids, a.mask, b.ids, b.mask]).encode())
    return h.hexdigest()


def reference_logps(ctx: StageContext, accelerator, scorer, records: list[tuple], *, pad_id: int,
                    micro: int) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """(chosen, rejected) log-probs [N] float32 of the starting model (``scorer()`` builds its
    `SequenceLogps`, only when the cache misses); True when read from the cache.

    Micro-batch k of the pairs goes to process k mod processes, so the values do not depend on
    the number of processes. Every process runs the same number of forwards (a sharded scorer
    gathers each layer from all of them): one short of work repeats its last chunk, discarded."""
    key = None
    if accelerator.is_main_process:
        key = cache_key(ctx.inputs["policy"], records, int(ctx.config["seq_len"]))
    key = gather_object([key])[0] if accelerator.num_processes > 1 else key
    path = Path(ctx.scratch) / CACHE / f"{key}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        return (cached["chosen"], cached["rejected"]), True
    model = scorer()
    was_training = model.training
    model.eval()
    starts, world = list(range(0, len(records), micro)), accelerator.num_processes
    rounds = -(-len(starts) // world)
    mine = {}
    for r in range(rounds):
        k = r * world + accelerator.process_index
        start = starts[min(k, len(starts) - 1)]
        chunk = records[start:start + micro]
        both = pairs.logps(model, [a for a, _ in chunk] + [b for _, b in chunk], pad_id=pad_id,
                           device=accelerator.device, micro=2 * micro, autocast=accelerator.autocast).cpu()
        if k < len(starts):
            mine[start] = (both[:len(chunk)], both[len(chunk):])
    model.train(was_training)
    del model
    every = {start: v for part in gather_object([mine]) for start, v in part.items()}
    chosen = torch.cat([every[start][0] for start in sorted(every)])
    rejected = torch.cat([every[start][1] for start in sorted(every)])
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"chosen": chosen, "rejected": rejected}, str(tmp))
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return (chosen, rejected), False
