"""Token streams for training stages: open a source's token shards, pack, shard over processes.

Owns the exact token arithmetic: a stage reads ``steps × seq_len × global_batch`` tokens starting
``data.offset`` tokens into the stream. It must not know about models or losses.

The stream is the concatenation, in the readers' file order, of every document's tokens followed
by the tokenizer's EOS, stored as token shards (`shards.py`): written by the plan's `tokenize`
stage for its (source, tokenizer), or, for a stage without one, into the workspace cache as far
as the stage needs. ``seq_len`` is deliberately not part of either: packing is a slice of the
stream, so a 16k and a 256k phase over the same data share one tokenisation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cascadec import mix
from cascadec.hub import TOKENIZER_FILES

from .readers import source_files
from .shards import FORMAT, Shards, finish, is_chat, tokenize


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
    """sha256 over the tokenizer files of a model directory (names and bytes).

    It keys the token cache and compares teacher and student tokenizers, so it must come from
    real files: a directory without any (or a hub id, which the executor resolves to its
    snapshot folder before a stage sees it) is an error, never the hash of nothing that every
    such tokenizer would share."""
    h, found = hashlib.sha256(), []
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            found.append(name)
    if not found:
        raise ValueError(f"{tokenizer_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                         "a model directory must carry its tokenizer")
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


class TokenStream:
    """The concatenated token stream of a shard folder (see `shards.py`), read by offset in
    O(log files) with constant memory."""

    def __init__(self, folder: Path):
        self.shards = Shards(folder)
        self.index = self.shards.index

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of the stream as int64."""
        return torch.from_numpy(self.shards.read(start, end))

    def sequence(self, window: Window, index: int) -> torch.Tensor:
        """The window's ``index``-th packed sequence."""
        return self.read(*window.sequence(index))


class MixStream:
    """A weighted mix of token streams, read sequence by sequence (`cascadec/mix.py` decides
    which source each sequence comes from): the window's sequence i is source s's j-th
    sequence after that source's own offset, so each source is read consecutively."""

    def __init__(self, streams: dict[str, TokenStream], weights: dict, sources: dict):
        self.streams, self.weights, self.sources = streams, weights, sources

    def sequence(self, window: Window, index: int) -> torch.Tensor:
        name, j = mix.locate(self.weights, index)
        start = self.sources[name]["offset"] + j * window.seq_len
        return self.streams[name].read(start, start + window.seq_len)

    def source_of(self, index: int) -> str:
        return mix.locate(self.weights, index)[0]


def _short(where, have: int, files: int, need: int) -> ValueError:
    return ValueError(f"data {where} has {have:,} tokens ({files} files) with this tokenizer; "
                      f"the stage needs {need:,} (offset + steps × seq_len × global_batch)")


def open_stream(source: dict, tokenizer, tokenizer_dir: Path, cache: Path, need: int | None,
                log: Callable[[str], None] = print) -> TokenStream:
    """Tokenise ``source``'s files in order, as far as ``need`` tokens (None: all of them), into a
    cache folder of ``cache`` and open the stream; fail clearly if the source is too short.

    For stages with no `tokenize` stage upstream (bootstrap trains its own tokenizer; tests).
    The folder is keyed by the source's reader settings, its file names and the tokenizer's
    files; each file's shard is redone when the file's size or mtime moved (`shards.py`)."""
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    files = source_files(source)
    settings = {k: v for k, v in source.items() if k != "paths"}
    key = hashlib.sha256(json.dumps({"format": FORMAT, "source": settings, "tokenizer": fingerprint,
                                     "files": [name for name, _ in files]}, sort_keys=True, default=str).encode())
    folder = Path(cache) / "tokens" / key.hexdigest()[:20]
    receipts = tokenize(files, source, tokenizer, folder, need=need, log=log, progress=False)
    index = finish(files[:len(receipts)], folder, folder, vocab=len(tokenizer), eos=tokenizer.eos_token_id,
                   tokenizer_sha256=fingerprint, chat=is_chat(source))
    if need is not None and index["tokens"] < need:
        raise _short(source.get("builtin") or source.get("paths"), index["tokens"], len(files), need)
    log(f"data: {len(receipts)} of {len(files)} files, {index['tokens']:,} tokens"
        + (f" (need {need:,})" if need is not None else ""))
    return TokenStream(folder)


def stage_stream(ctx, tokenizer, tokenizer_dir: Path, need: int | None) -> TokenStream | MixStream:
    """The token stream a stage reads: its `tokenize` stage's shards (input `tokens`) when the
    plan has one, checked against the stage's tokenizer; else `open_stream` over its source.
    A stage reading a mix gets a `MixStream` over one stream per source (roles `tokens:<s>`),
    each checked to hold the source's window (``need`` is then the plan's, per source)."""
    data = ctx.config.get("data") or {}
    if data.get("sources"):
        streams = {name: shard_stream(ctx.inputs[f"tokens:{name}"], tokenizer_dir, w["offset"] + w["tokens"])
                   for name, w in data["sources"].items()}
        return MixStream(streams, data["mix"], data["sources"])
    if "tokens" not in ctx.inputs:
        return open_stream(ctx.source(), tokenizer, tokenizer_dir, ctx.token_cache(), need, ctx.log)
    return shard_stream(ctx.inputs["tokens"], tokenizer_dir, need)


def shard_stream(folder: Path, tokenizer_dir: Path, need: int | None) -> TokenStream:
    """A tokenize stage's shards, refused when made with another tokenizer or too short (``need``
    tokens; None: any length, for sft, which reads whole conversations and repeats them in epochs)."""
    stream = TokenStream(folder)
    if stream.index["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer_dir):
        raise ValueError(f"{folder} was tokenised with another tokenizer than {tokenizer_dir}'s; "
                         "the plan's tokenize stage must use the tokenizer of the models that read it")
    if need is not None and len(stream) < need:
        raise _short(folder, len(stream), len(stream.index["files"]), need)
    return stream


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
        rows = [stream.sequence(window, i) for i in indices]
        yield torch.stack(rows), indices


def source_tokens(stream, window: Window, rank: int, world: int) -> dict[str, int]:
    """Tokens of each mix source among the sequences process ``rank`` reads over the whole
    window (the positions `micro_batches` visits); summed over processes, the stage's counts."""
    per_rank = window.global_batch // world
    counts = dict.fromkeys(sorted(stream.sources), 0)
    for step in range(window.steps):
        first = step * window.global_batch + rank * per_rank
        for p in range(first, first + per_rank):
            counts[stream.source_of(window.visit(p))] += window.seq_len
    return counts


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
