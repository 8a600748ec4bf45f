"""The `bootstrap` stage: pretrain a small Mistral-architecture parent from scratch.

Owns the tokenizer and the architecture of that parent (a byte-level BPE trained on the stage's
data; a `MistralConfig` of ``config.shape``); training is the shared loop. Used by the tiny
family, whose parent does not exist anywhere until this stage makes it.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState
from transformers import AutoTokenizer, MistralConfig

from cascadec.shapes import Shape

from ..context import StageContext
from ..data.chat import ensure_template
from ..data.readers import Skips, documents, source_files
from ..data.tokenizer import train_bpe
from ..training.fsdp import empty_on_this_rank
from ..training.models import init_model
from ..training.train import on_cpu, train

TOKENIZER_CHARS = 20_000_000  # BPE is trained on the first files up to this many characters


def run(ctx: StageContext) -> dict:
    config = ctx.config
    shape = Shape(**config["shape"])
    vocab = int((config.get("tokenizer") or {}).get("vocab_size") or shape.vocab)
    if vocab != shape.vocab:
        raise ValueError(f"tokenizer.vocab_size {vocab} differs from shape.vocab {shape.vocab}")
    tokenizer_dir = tokenizer_for(ctx, vocab)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_config = MistralConfig(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=shape.tied_embeddings,
        max_position_embeddings=max(int(config["seq_len"]), 2048), sliding_window=None,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = init_model(model_config, seed=int(config.get("seed", 0)), rope=config.get("rope"),
                       empty=empty_on_this_rank(ctx.stage))
    ctx.log(f"bootstrap: random Mistral, {sum(p.numel() for p in model.parameters()):,} parameters, vocab {vocab}")
    return train(ctx, model, tokenizer, tokenizer_dir)


def tokenizer_for(ctx: StageContext, vocab: int) -> Path:
    """Train (once; kept in scratch so a resumed run tokenises identically) the stage's BPE."""
    path = Path(ctx.scratch) / "tokenizer"
    with PartialState(cpu=on_cpu()).main_process_first():
        if not (path / "tokenizer.json").exists():
            _train_tokenizer(ctx, vocab, path)
    return path


def _train_tokenizer(ctx: StageContext, vocab: int, path: Path) -> None:
    source, texts, chars, skips = ctx.source(), [], 0, Skips()
    for _, file in source_files(source):
        for text in documents(file, source, skips):
            texts.append(text)
            chars += len(text)
        if chars >= TOKENIZER_CHARS:
            break
    if skips.total:
        ctx.log(f"tokenizer sample: {skips.total} bad records skipped (on_error: skip); first: {skips.first[0]}")
    tmp = path.with_name("tokenizer.tmp")
    train_bpe(texts, vocab).save_pretrained(tmp)
    ensure_template(tmp)  # the parent, and every child cut from it, can render chat (docs/data.md)
    tmp.rename(path)
