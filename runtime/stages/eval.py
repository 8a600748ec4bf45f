"""`eval` stage: held-out next-token loss of every checkpoint of one model or child.

All checkpoints of a family share the root's tokenizer (pruning copies it), so every figure
is the mean cross-entropy over the very same held-out tokens and the numbers compare directly.
"""

from __future__ import annotations

import json
import math
import time

import torch
import transformers as tf

from ..context import StageContext
from ..data.stream import open_stream
from ..training.models import load_model

ROLE = "checkpoint:"


@torch.no_grad()
def heldout_loss(model, stream, tokens: int, seq_len: int, batch: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy over the first ``tokens // seq_len`` packed sequences.

    Returns (loss in nats per predicted token, predicted tokens). Every sequence contributes
    ``seq_len - 1`` predictions; nothing is padded.
    """
    n = tokens // seq_len
    total, count = 0.0, 0
    for first in range(0, n, batch):
        ids = torch.stack([stream.read(i * seq_len, (i + 1) * seq_len) for i in range(first, min(n, first + batch))])
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return total / count, count


def run(ctx: StageContext) -> dict:
    cfg = ctx.config
    source = ctx.source()
    results = {}
    for name in cfg["checkpoints"]:
        path = ctx.inputs[ROLE + name]
        started = time.time()
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        stream = open_stream(source, tokenizer, path, ctx.token_cache(), cfg["tokens"], log=ctx.log)
        model = load_model(path).eval()
        loss, count = heldout_loss(model, stream, cfg["tokens"], cfg["seq_len"])
        params = sum(p.numel() for p in model.parameters())
        results[name] = {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4),
                         "tokens": count, "params": params}
        ctx.log(f"eval {name}: loss {loss:.4f} (ppl {math.exp(loss):.2f}) on {count:,} tokens, "
                f"{time.time() - started:.1f}s")
        del model
    (ctx.out / "eval.json").write_text(json.dumps({"checkpoints": results}, indent=2, sort_keys=True) + "\n")
    return {"checkpoints": {k: v["loss"] for k, v in results.items()}}
