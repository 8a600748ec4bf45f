"""Packed chat rows: whole conversations of a chat source's token shards packed into fixed-length
rows, with restarting position ids and next-token labels on the trained tokens. No models here.

Owns the packing rule, the row order (epochs, shuffle) and the row digest that the top-k teacher
cache is checked by. The sft stage and the teacher-logits stage over a chat source build the same
`PackedRows` from the same shards and ``seq_len``, so a cached row k holds the teacher's logits for
exactly the row k the students train on.

Packing (deterministic, a function of the example lengths and ``seq_len`` only):
1. Examples are the source's conversations that start at or after ``data.offset`` in the stream;
   one longer than ``seq_len`` keeps its first ``seq_len`` tokens (counted as truncated).
2. Best-fit decreasing: examples by length, longest first (ties: stream order), each into the
   open row with the least room that still fits it, else a new row. It never splits a
   conversation and fills 99.99 % of 16k-token rows with 1k-token conversations, where next-fit
   in stream order fills 92 % (`benchmarks/packing.py`).
3. Rows are then listed in a fixed scattered order (``k -> a·k mod R``, ``a`` near R/φ and coprime
   to R), so that any prefix of rows holds short and long conversations alike: a stage whose
   budget is smaller than the data trains on the first ``S`` rows of this order, and the
   teacher-logits stage computes the first rows its largest reader needs.

Each row is padded to ``seq_len`` with the pad token (EOS when the tokenizer has none). Position ids
restart at 0 for every conversation and for the padding, which is how the model sees separate
sequences: transformers derives a block-diagonal causal mask from restarting position ids when no
attention mask is given (``masking_utils.find_packed_sequence_indices``; tested, packed = unpacked).

Labels: position t predicts token t+1 of the *same* conversation, and only where that token is
trained (the assistant mask; every token of the conversation with ``assistant_only: false``). The
first token of a conversation, the padding and everything past a conversation's end are never
targets.

Order and epochs: a stage reads ``S = steps × global_batch`` rows from its ``n = min(R, S)`` rows;
training position p is epoch ``p // n`` and row ``perm_e(p mod n)``, where ``perm_e`` is a
permutation seeded by (seed, epoch) when ``data.shuffle`` is on (identity otherwise). A budget above
the data thus repeats it, in a new order each epoch; the epochs are reported in the metrics.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..training.kd import IGNORE_INDEX  # the label of an untrained position


@dataclass(frozen=True)
class MicroBatch:
    """What the training loop feeds the model for one micro-batch."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX where nothing is trained
    position_ids: torch.Tensor | None  # [B, T] restarting per packed example; None = 0..T-1
    indices: list[int]  # the row (sequence) indices, for a teacher-logits cache


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack items of ``lengths`` (each ≤ capacity) into bins; return (offsets [R+1], members).

    Bin r holds ``members[offsets[r]:offsets[r+1]]`` (item indices, in the order placed). Open bins
    are kept by remaining room in buckets, and the sorted list of distinct rooms (at most
    ``capacity`` + 1 values) finds the tightest bin by bisection.
    """
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in stream order
    rooms: list[int] = []  # distinct remaining rooms of open bins, ascending
    bins_by_room: dict[int, list[int]] = {}
    bins: list[list[int]] = []
    for item in order.tolist():
        size = int(lengths[item])
        i = bisect.bisect_left(rooms, size)
        if i < len(rooms):
            room = rooms[i]
            b = bins_by_room[room].pop()
            if not bins_by_room[room]:
                del bins_by_room[room]
                rooms.pop(i)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(item)
        left = room - size
        if left > 0:  # a full bin is closed
            if left not in bins_by_room:
                bins_by_room[left] = []
                bisect.insort(rooms, left)
            bins_by_room[left].append(b)
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in bins])
    members = np.fromiter((x for b in bins for x in b), dtype=np.int64, count=int(offsets[-1]))
    return offsets, members


def scatter_stride(n: int) -> int:
    """``a`` near n/φ and coprime to n: ``k -> a·k mod n`` visits 0..n-1 with far-apart neighbours."""
    a = max(1, round(n * 0.6180339887498949))
    while math.gcd(a, n) != 1:
        a += 1
    return a


class PackedRows:
    """The packed rows of a chat source's shards (`shards.Shards` with ``chat``) at ``seq_len``."""

    def __init__(self, shards, seq_len: int, *, offset: int = 0, pad_id: int, assistant_only: bool = True):
        if not shards.chat:
            raise ValueError(f"{shards.folder} holds plain text shards; sft packs conversations, so its data "
                             "must be a chat source (`format: chat`), tokenised by this cascadec (rerun its "
                             "tokenize stage if it was made by an older one)")
        self.shards, self.seq_len, self.pad_id, self.assistant_only = shards, int(seq_len), int(pad_id), assistant_only
        ends = shards.document_ends()
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        keep = starts >= offset
        self.starts, full = starts[keep], (ends - starts)[keep]
        self.lengths = np.minimum(full, self.seq_len)
        self.truncated = int((full > self.seq_len).sum())
        if not len(self.lengths):
            raise ValueError(f"{shards.folder}: no conversation starts at or after offset {offset:,} "
                             f"(the source holds {len(shards):,} tokens)")
        offsets, members = best_fit_decreasing(self.lengths, self.seq_len)
        self.offsets, self.members = offsets, members
        self.rows = len(offsets) - 1
        self.stride = scatter_stride(self.rows)

    @property
    def examples(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Conversation tokens in the rows (after truncation), padding excluded."""
        return int(self.lengths.sum())

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``k`` of the scattered order: (ids, position ids, labels), each [seq_len] int64."""
        if not 0 <= k < self.rows:
            raise IndexError(f"packed row {k} of {self.rows}")
        b = (self.stride * k) % self.rows
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        positions = np.zeros(self.seq_len, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        at = 0
        for e in self.members[self.offsets[b]:self.offsets[b + 1]].tolist():
            n, start = int(self.lengths[e]), int(self.starts[e])
            tokens = self.shards.read(start, start + n)
            ids[at:at + n] = tokens
            positions[at:at + n] = np.arange(n)
            trained = self.shards.mask(start, start + n)[1:] if self.assistant_only else np.ones(n - 1, np.int64)
            labels[at:at + n - 1] = np.where(trained == 1, tokens[1:], IGNORE_INDEX)
            at += n
        positions[at:] = np.arange(self.seq_len - at)  # the padding is one more sequence, never a target
        return ids, positions, labels

    def batch(self, rows: list[int]) -> MicroBatch:
        ids, positions, labels = zip(*(self.row(k) for k in rows))
        as_tensor = lambda xs: torch.from_numpy(np.stack(xs))  # noqa: E731
        return MicroBatch(as_tensor(ids), as_tensor(labels), as_tensor(positions), list(rows))

    def span(self, n: int) -> str:
        return f"ids of packed rows [0, {n:,}) of {self.seq_len} tokens"

    def ids_sha256(self, n: int) -> str:
        """sha256 of rows [0, n) (ids then position ids, little-endian int32): what a teacher-logits
        cache built on these rows records and a reader checks."""
        h = hashlib.sha256()
        for k in range(n):
            ids, positions, _ = self.row(k)
            h.update(ids.astype("<i4").tobytes())
            h.update(positions.astype("<i4").tobytes())
        return h.hexdigest()


class RowOrder:
    """Which packed row a training position reads: ``n = min(rows, sequences)`` rows, repeated in
    epochs, each epoch in its own seeded order when shuffled (module docstring)."""

    def __init__(self, rows: int, sequences: int, *, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = min(rows, sequences), int(seed), shuffle
        self._epoch, self._perm = -1, None

    def __call__(self, position: int) -> int:
        epoch, j = divmod(position, self.n)
        if not self.shuffle:
            return j
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[j]

    def epochs(self, positions: int) -> float:
        """Passes over the stage's rows after ``positions`` rows read."""
        return positions / self.n


class PackedBatches:
    """The sft stage's batch source: `PackedRows` read in `RowOrder`, split over processes like the
    stream (`stream.micro_batches`: step ``s`` covers positions [s·G, (s+1)·G), process r a block)."""

    packed = True

    def __init__(self, rows: PackedRows, order: RowOrder, window):
        self.rows, self.order, self.window = rows, order, window

    @classmethod
    def open(cls, ctx, tokenizer, tokenizer_dir, window) -> "PackedBatches":
        from .stream import stage_stream

        config = ctx.config
        if (config.get("data") or {}).get("sources"):
            raise ValueError(f"stage {ctx.stage.get('id')} reads a mix; sft packs the conversations of one chat "
                             "source (list the files of several in one source's `paths`)")
        stream = stage_stream(ctx, tokenizer, tokenizer_dir, None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = PackedRows(stream.shards, window.seq_len, offset=window.offset, pad_id=pad,
                          assistant_only=bool(config.get("assistant_only", True)))
        order = RowOrder(rows.rows, window.sequences, seed=int(config.get("seed", 0)), shuffle=window.shuffle)
        return cls(rows, order, window)

    @property
    def sequences(self) -> int:
        """Rows a teacher-logits cache must hold for this stage: the first ``n`` of the packed order."""
        return self.order.n

    def micro_batches(self, step: int, rank: int, world: int, micro: int):
        from .stream import per_process

        per_rank = per_process(self.window.global_batch, world, micro)
        first = step * self.window.global_batch + rank * per_rank
        for m in range(per_rank // micro):
            yield self.rows.batch([self.order(p) for p in range(first + m * micro, first + (m + 1) * micro)])

    def span(self, n: int) -> str:
        return self.rows.span(n)

    def ids_sha256(self, n: int) -> str:
        return self.rows.ids_sha256(n)

    def summary(self, window) -> dict:
        """What the stage's manifest records about its data."""
        r = self.rows
        return {"examples": r.examples, "rows": r.rows, "rows_used": self.order.n, "truncated": r.truncated,
                "fill": round(r.tokens / (r.rows * r.seq_len), 6), "epochs": round(self.order.epochs(window.sequences), 6)}
