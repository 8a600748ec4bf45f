"""The `tokenize` stage: one data source through one tokenizer into token shards on disk.

The compiler plans one per (source, tokenizer) and every stage that reads the source with that
tokenizer reads its `tokens` output (`data/shards.py` has the layout). Runs over all the
stage's processes (nodes too): process r of w tokenises files r, r+w, ... into scratch, where a
finished file survives a kill (resume is per file); the main process then moves the shards into
place and writes the index. Per-file token counts go to the manifest's metrics. A chat source is
rendered with the tokenizer's chat template and stored with its assistant mask (`shards.py`).
"""

from __future__ import annotations

import time
from pathlib import Path

from accelerate import PartialState
from transformers import AutoTokenizer

from ..context import StageContext
from ..data import shards
from ..data.readers import source_files
from ..data.stream import tokenizer_fingerprint
from ..training.train import on_cpu


def run(ctx: StageContext) -> dict:
    state, started = PartialState(cpu=on_cpu()), time.perf_counter()
    source = ctx.source()
    tokenizer_dir = Path(ctx.inputs["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = source_files(source)
    work = Path(ctx.scratch) / "shards"
    mine = shards.tokenize(files, source, tokenizer, work, rank=state.process_index,
                           world=state.num_processes, log=ctx.log)
    ctx.log(f"tokenize: rank {state.process_index}: {len(mine)} files, {sum(r['tokens'] for r in mine):,} tokens")
    state.wait_for_everyone()
    metrics = {}
    if state.is_main_process:
        done = [r for r in shards.receipts(files, work) if r is not None]
        ranks = [r["rank"] for r in done]
        index = shards.finish(files, work, Path(ctx.out) / "tokens", vocab=len(tokenizer),
                              eos=tokenizer.eos_token_id, tokenizer_sha256=tokenizer_fingerprint(tokenizer_dir),
                              chat=shards.is_chat(source))
        seconds = time.perf_counter() - started
        metrics = {"tokens": index["tokens"], "documents": index["documents"], "files": len(files),
                   "file_tokens": {f["name"]: f["tokens"] for f in index["files"]},
                   # under `on_error: skip`: the records passed over, per file, and the first reasons
                   "skipped": {"skipped": sum(r["skipped"] for r in done),
                               "per_file": {r["name"]: r["skipped"] for r in done if r["skipped"]},
                               "first": [m for r in done for m in r["skip_reasons"]][:5]},
                   "processes": state.num_processes, "files_per_rank": {str(r): ranks.count(r) for r in sorted(set(ranks))},
                   "tokens_per_s": round(index["tokens"] / max(seconds, 1e-9))}
        ctx.log(f"tokenize: {len(files)} files, {index['tokens']:,} tokens, {metrics['tokens_per_s']:,} tokens/s")
    state.wait_for_everyone()
    return metrics
