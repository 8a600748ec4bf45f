"""The on-disk format of cached top-k teacher logits: safetensors shards plus ``index.json``.

Written by the teacher-logits stage, read by the distill stage. Per token a shard holds:

- ``values`` [sequences, seq_len, k]: the teacher's k largest raw logits (temperature is applied
  at distill time), fp32 when the stage's precision is fp32 and fp16 otherwise (fp16 has 3 more
  mantissa bits than bf16, and logits are far inside its range);
- ``indices`` [sequences, seq_len, k]: their int32 vocab ids;
- ``lse_rest`` [sequences, seq_len, T]: fp32 log-sum-exp of the teacher's logits divided by τ over
  the ids *outside* the top-k, one column per temperature in ``index.json``'s ``temperatures``.
  With the top-k values it gives the teacher's full-vocabulary normaliser and its rest mass, which
  unbiased top-k distillation needs (see `kd.py`). The rest is stored, not the full log-sum-exp,
  because the rest mass recovered from a full one (1 − Σ top-k) cancels catastrophically when
  the top-k holds nearly all the mass. A temperature change needs the cache rebuilt: the rest
  at one τ cannot be derived from another.

``index.json`` also records the teacher's tokenizer fingerprint (sha256 of its tokenizer files)
and ``ids_sha256``, a digest of the input ids the cache was built on, so that a distill stage can
refuse logits that belong to other tokens. Caches without ``format: 2`` (no ``lse_rest``) are
refused with a message saying how to rebuild them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "index.json"
FORMAT = 2
DIGEST_BLOCK = 1 << 22  # tokens hashed per read: constant memory over any window


def value_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.float16


def ids_digest(stream, start: int, end: int) -> str:
    """sha256 of the token ids [start, end) of a `data.TokenStream`, as little-endian int32."""
    h = hashlib.sha256()
    for lo in range(start, end, DIGEST_BLOCK):
        h.update(stream.read(lo, min(lo + DIGEST_BLOCK, end)).to(torch.int32).numpy().astype("<i4", copy=False))
    return h.hexdigest()


class TopKCache:
    """Read the cached teacher logits of window sequences by index.

    ``stage`` names the stage that builds the cache, for the "rebuild it" hint of the errors.
    """

    def __init__(self, path: Path, stage: str | None = None):
        self.path = Path(path)
        self.index = json.loads((self.path / INDEX).read_text())
        self.shards = sorted(self.index["shards"], key=lambda s: s["first"])
        self.rebuild = f"rebuild it: cascadec run PLAN --force '{stage or self.index.get('stage') or 'teacher-logits/*'}'"
        if self.index.get("format") != FORMAT:
            raise ValueError(
                f"teacher logits cached at {self.path} have no teacher log-sum-exp outside the top-k (written by "
                f"an older cascadec, format {self.index.get('format', 1)}); unbiased top-k distillation needs "
                f"it, and the renormalised top-k it used to fall back to is biased; {self.rebuild}")

    def check_vocab(self, vocab: int) -> None:
        if self.index["vocab"] != vocab:
            raise ValueError(f"teacher vocabulary has {self.index['vocab']} entries but the student's has {vocab}")

    def check(self, *, seq_len: int, offset: int, sequences: int, temperature: float) -> None:
        """Fail clearly unless the cache covers this stage's window (its first ``sequences`` rows) at τ."""
        ix = self.index
        if ix["seq_len"] != seq_len or ix["offset"] != offset or ix["sequences"] < sequences:
            raise ValueError(
                f"cached teacher logits cover {ix['sequences']} sequences of {ix['seq_len']} tokens from "
                f"offset {ix['offset']}; this stage needs {sequences} of {seq_len} from offset {offset}"
            )
        if float(temperature) not in self.temperatures:
            raise ValueError(
                f"teacher logits cached at {self.path} hold the rest mass at temperature(s) "
                f"{', '.join(map(str, self.temperatures))}; this stage distills at {temperature}; {self.rebuild} "
                "(the plan lists in its config the temperatures of the stages that read it)")

    def check_tokens(self, data) -> None:
        """Fail unless the cache was built on exactly the rows ``data`` reads: the digest of its first
        ``sequences`` rows (``data.ids_sha256``; stream windows, or packed chat rows)."""
        n = int(self.index["sequences"])
        ours = data.ids_sha256(n)
        if ours != self.index["ids_sha256"]:
            raise ValueError(
                f"teacher logits cached at {self.path} were built on other tokens than this stage reads "
                f"(sha256 of the input {data.span(n)}: cache {self.index['ids_sha256'][:12]}, "
                f"this stage {ours[:12]}); the data or its tokenisation changed since; {self.rebuild}")

    @property
    def top_k(self) -> int:
        return int(self.index["top_k"])

    @property
    def temperatures(self) -> list[float]:
        return [float(t) for t in self.index["temperatures"]]

    @property
    def tokenizer(self) -> str:
        """sha256 of the teacher's tokenizer files (`data.tokenizer_fingerprint`)."""
        return self.index["tokenizer_sha256"]

    def read(self, sequences: list[int], temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, indices) [len(sequences), seq_len, k] and the rest log-sum-exp at ``temperature``
        [len(sequences), seq_len]."""
        column = self.temperatures.index(float(temperature))
        values, indices, rest = [], [], []
        for i in sequences:
            shard = next(s for s in self.shards if s["first"] <= i < s["first"] + s["count"])
            with safe_open(str(self.path / shard["file"]), "pt") as f:
                row = i - shard["first"]
                values.append(f.get_slice("values")[row : row + 1])
                indices.append(f.get_slice("indices")[row : row + 1])
                rest.append(f.get_slice("lse_rest")[row : row + 1, :, column])
        return torch.cat(values), torch.cat(indices), torch.cat(rest)
