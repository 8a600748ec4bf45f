"""Calibration tokens: a plan data source (text, jsonl, or the interpreter's stdlib), packed.

Owns packing a small calibration set; file discovery and document reading are runtime/data/stream.py's
(the same sorted file order and readers as training), so this module must not re-implement them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.readers import Skips, documents, source_files

# With no calibration data given: the running interpreter's standard-library ``.py`` sources,
# in data/stream.py's deterministic sorted order (site-packages excluded). Every Python install
# carries them, so calibration works offline; the scores are then those of code text.
BUILTIN = {"kind": "builtin", "builtin": "stdlib"}


def pack(tokenizer, source: dict | None, *, samples: int, seq_len: int, offset: int = 0,
         skips: Skips | None = None) -> torch.Tensor:
    """``[samples, seq_len]`` token ids: documents joined by EOS, the first ``offset`` tokens skipped.

    Tokenises only as many documents as needed. Raises ValueError when the text is too short
    rather than repeating it (repeated text would bias every score). Records skipped under the
    source's ``on_error: skip`` are counted in ``skips``.
    """
    source = source or BUILTIN
    need = offset + samples * seq_len
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for _, path in source_files(source):
        for text in documents(path, source, skips):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"calibration text has {len(ids)} tokens; {samples} samples of "
                         f"{seq_len} tokens (offset {offset}) need {need}")
    return torch.tensor(ids[offset:need], dtype=torch.long).view(samples, seq_len)


def file_source(path: Path | None) -> dict | None:
    """The data source for one ``--calibration FILE`` by its name: ``.parquet``, ``.jsonl`` (also
    ``.gz``/``.zst``; field ``text`` in both), else text; None: builtin."""
    if path is None:
        return None
    name = Path(path).name
    kind = ("parquet" if name.endswith(".parquet")
            else "jsonl" if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")) else "text")
    return {"kind": kind, "paths": [str(path)], "field": "text"}
