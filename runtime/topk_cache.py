"""The on-disk format of cached top-k teacher logits: safetensors shards plus ``index.json``.

Written by the teacher-logits stage, read by the distill stage. Values are the teacher's raw
logits (temperature is applied at distill time) stored in fp32 when the stage's precision is
fp32 and in fp16 otherwise (fp16 has 3 more mantissa bits than bf16, and logits are far inside
its range); indices are int32 vocab ids. Shard ``values``/``indices`` are [sequences, seq_len, k].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "index.json"


def value_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.float16


class TopKCache:
    """Read the cached teacher logits of window sequences by index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.index = json.loads((self.path / INDEX).read_text())
        self.shards = sorted(self.index["shards"], key=lambda s: s["first"])

    def check(self, *, vocab: int, seq_len: int, offset: int, sequences: int) -> None:
        """Fail clearly unless the cache covers exactly this stage's window and vocabulary."""
        ix = self.index
        if ix["vocab"] != vocab:
            raise ValueError(f"teacher vocabulary has {ix['vocab']} entries but the student's has {vocab}")
        if ix["seq_len"] != seq_len or ix["offset"] != offset or ix["sequences"] < sequences:
            raise ValueError(
                f"cached teacher logits cover {ix['sequences']} sequences of {ix['seq_len']} tokens from "
                f"offset {ix['offset']}; this stage needs {sequences} of {seq_len} from offset {offset}"
            )

    @property
    def top_k(self) -> int:
        return int(self.index["top_k"])

    def read(self, sequences: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each [len(sequences), seq_len, k]."""
        values, indices = [], []
        for i in sequences:
            shard = next(s for s in self.shards if s["first"] <= i < s["first"] + s["count"])
            with safe_open(str(self.path / shard["file"]), "pt") as f:
                row = i - shard["first"]
                values.append(f.get_slice("values")[row : row + 1])
                indices.append(f.get_slice("indices")[row : row + 1])
        return torch.cat(values), torch.cat(indices)
