"""Token streams for training stages: tokenise source documents (cached), pack, shard.

Owns the exact token arithmetic: a stage reads ``steps × seq_len × global_batch`` tokens starting
``data.offset`` tokens into the stream. It must not know about models or losses.

The stream is the concatenation, in sorted file order, of every document's tokens followed by
the tokenizer's EOS. Each *file* is tokenised once and cached under a content key
(sha256 of the file's bytes, the reader kind/field and the tokenizer files). ``seq_len`` is
deliberately not part of the key: packing is a slice of the stream, so a 16k and a 256k phase
over the same data share one cache. Files are tokenised lazily, only as far as a stage needs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .readers import documents, source_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass(frozen=True, kw_only=True)
class Window:
    """Which tokens of the stream a stage trains on, and how they are batched."""

    seq_len: int
    global_batch: int  # sequences per optimiser step, over all processes
    steps: int
    offset: int = 0  # tokens skipped at the start of the stream
    shuffle: bool = False  # visit the window's sequences in a fixed scattered order

    @classmethod
    def from_config(cls, config: dict) -> "Window":
        data = config.get("data") or {}
        return cls(seq_len=int(config["seq_len"]), global_batch=int(config["global_batch"]),
                   steps=int(config["steps"]), offset=int(data.get("offset") or 0),
                   shuffle=bool(data.get("shuffle", False)))

    @property
    def sequences(self) -> int:
        return self.steps * self.global_batch

    def visit(self, position: int) -> int:
        """The window sequence read at ``position`` of the training order.

        Unshuffled, the order is the stream's. Shuffled, it is the affine bijection
        ``position -> a * position mod n`` with ``a`` near ``n / phi`` and coprime to ``n``: O(1)
        memory at any scale (a 3T-token window has ~10^8 sequences), deterministic (resume and
        every process agree), and consecutive positions land far apart, so one optimiser step
        never draws all its sequences from one file. The window's token set is unchanged.
        """
        if not self.shuffle:
            return position
        n = self.sequences
        return (_stride(n) * position) % n

    @property
    def tokens(self) -> int:
        return self.steps * self.seq_len * self.global_batch

    def sequence(self, index: int) -> tuple[int, int]:
        """Stream [start, end) of the window's ``index``-th packed sequence."""
        start = self.offset + index * self.seq_len
        return start, start + self.seq_len


def _stride(n: int) -> int:
    import math

    a = max(1, round(n * 0.6180339887498949))
    while math.gcd(a, n) != 1:
        a += 1
    return a


# ---------------------------------------------------------------------------------------------
# Tokenisation with a content-addressed cache


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 over the tokenizer files of a model directory (names and bytes)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.exists():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` byte for byte (not re-saved: `save_pretrained` rewrites
    ``tokenizer_config.json``, which would change the fingerprint a teacher is compared by)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def tokenize_file(path: Path, source: dict, tokenizer, fingerprint: str, cache: Path) -> Path:
    """Tokenise one file (EOS after every document) unless cached; return the cached shard."""
    kind, field = source.get("kind", "text"), source.get("field") or "text"
    key = hashlib.sha256(f"v1\0{kind}\0{field}\0{fingerprint}\0".encode() + path.read_bytes()).hexdigest()
    shard = Path(cache) / key[:2] / f"{key}.safetensors"
    if shard.exists():
        return shard
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; documents could not be separated")
    ids: list[int] = []
    for encoded in tokenizer(list(documents(path, source)), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    shard.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard.with_suffix(f".tmp{os.getpid()}")
    save_file({"tokens": torch.tensor(ids, dtype=torch.int32)}, str(tmp), metadata={"source": str(path)})
    os.replace(tmp, shard)  # atomic: a killed run never leaves a half-written shard
    return shard


class TokenStream:
    """The concatenated token stream of a source, read by ranges without loading it whole."""

    def __init__(self, shards: list[Path]):
        self.shards = shards
        self.lengths = [shard_length(s) for s in shards]

    def __len__(self) -> int:
        return sum(self.lengths)

    def read(self, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of the stream as int64."""
        parts, base = [], 0
        for shard, length in zip(self.shards, self.lengths):
            lo, hi = max(start - base, 0), min(end - base, length)
            if lo < hi:
                with safe_open(str(shard), "pt") as f:
                    parts.append(f.get_slice("tokens")[lo:hi])
            base += length
        out = torch.cat(parts).long() if parts else torch.empty(0, dtype=torch.long)
        if out.numel() != end - start:
            raise IndexError(f"stream has {len(self)} tokens; asked for [{start}, {end})")
        return out


def shard_length(shard: Path) -> int:
    with safe_open(str(shard), "pt") as f:
        return f.get_slice("tokens").get_shape()[0]


def open_stream(source: dict, tokenizer, tokenizer_dir: Path, cache: Path, need: int,
                log: Callable[[str], None] = print) -> TokenStream:
    """Tokenise files in order until the stream holds ``need`` tokens; fail clearly if it cannot."""
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    shards, total = [], 0
    files = source_files(source)
    for _, path in files:
        if total >= need:
            break
        shards.append(tokenize_file(path, source, tokenizer, fingerprint, cache))
        total += shard_length(shards[-1])
    if total < need:
        where = source.get("builtin") or source.get("paths")
        raise ValueError(
            f"data {where} has {total:,} tokens ({len(files)} files) with this tokenizer; "
            f"the stage needs {need:,} (offset + steps × seq_len × global_batch)"
        )
    log(f"data: {len(shards)} of {len(files)} files, {total:,} tokens (need {need:,})")
    return TokenStream(shards)


# ---------------------------------------------------------------------------------------------
# Deterministic sharding and the resumable position


def micro_batches(stream: TokenStream, window: Window, step: int, rank: int, world: int,
                  micro_batch: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """The micro-batches (input ids [micro_batch, seq_len], sequence indices) of one process.

    Global step ``step`` covers window sequences [step·G, (step+1)·G) with G = global_batch;
    process ``rank`` takes the contiguous block of G/world of them, in micro-batches. The split
    depends only on (step, rank, world), so a resumed or relaunched run reads the same tokens.
    """
    per_rank = per_process(window.global_batch, world, micro_batch)
    first = step * window.global_batch + rank * per_rank
    for m in range(per_rank // micro_batch):
        indices = [window.visit(p) for p in range(first + m * micro_batch, first + (m + 1) * micro_batch)]
        rows = [stream.read(*window.sequence(i)) for i in indices]
        yield torch.stack(rows), indices


def per_process(global_batch: int, world: int, micro_batch: int) -> int:
    if global_batch % (world * micro_batch):
        raise ValueError(
            f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} × {world} processes"
        )
    return global_batch // world


class DataPosition:
    """Where the stage is in its window; saved with every step checkpoint (Accelerate custom state)."""

    def __init__(self, window: Window):
        self.window = window
        self.step = 0  # optimiser steps completed

    @property
    def tokens(self) -> int:
        return self.step * self.window.seq_len * self.window.global_batch

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "offset": self.window.offset,
                "seq_len": self.window.seq_len, "global_batch": self.window.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("offset", "seq_len", "global_batch"):
            if state[key] != getattr(self.window, key):
                raise ValueError(f"checkpoint was taken with {key}={state[key]}, this stage has {getattr(self.window, key)}")
        self.step = int(state["step"])
