"""Data sources: which units a plan data source names, in a deterministic order, and the documents,
records or token ids inside them.

Owns reading and the errors of bad data (no tokenisation, no torch); token streams are stream.py's,
file formats formats.py's, Hugging Face dataset layouts hf.py's. docs/data.md is the user's view.

The interface other modules build on:
- ``source_files(source) -> [(stable name, path)]``: the unit of sharding and resume (a file; an
  arrow shard of a `save_to_disk` dataset; a data file of a cached hub snapshot), sorted.
- ``documents(path, source, skips) -> Iterator[str]``: the texts of one unit.
- ``token_documents(path, source, skips) -> Iterator[np.ndarray]``: the token ids of one unit of a
  ``kind: tokenized`` source, one array per document (no EOS appended; the stream adds it).
- ``records(path, source, skips) -> Iterator[(where, dict)]``: raw records, for chat.py.
Bad data raises ``DataError`` naming the file and the record; with ``on_error: skip`` the record is
skipped and counted in ``skips`` (a ``Skips``, which the stage writes into its manifest).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import formats
from .formats import DataError, shown

__all__ = ["DataError", "Skips", "source_files", "documents", "token_documents", "records"]

READERS = ("text", "jsonl", "parquet", "dataset", "tokenized", "builtin")
RECORD_KINDS = ("jsonl", "parquet", "dataset")
BUILTINS = ("stdlib",)
HELDOUT_EVERY = 20  # the stdlib's held-out split: files whose path hash is 0 mod 20 (~5 %)
EXAMPLES = 5  # skipped records quoted in a manifest


@dataclass
class Skips:
    """Records skipped under ``on_error: skip``: counts per file and the first few reasons."""

    per_file: dict[str, int] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)

    def add(self, path: Path, error: DataError) -> None:
        name = shown(path)
        self.per_file[name] = self.per_file.get(name, 0) + 1
        if len(self.first) < EXAMPLES:
            self.first.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.per_file.values())

    def manifest(self) -> dict:
        """What a stage's manifest records: the total, per-file counts, the first reasons."""
        return {"skipped": self.total, "per_file": dict(sorted(self.per_file.items())), "first": list(self.first)}


def hint(source: dict, key: str) -> str:
    """'set data.<name>.<key>' (the spec key a user edits to fix the error)."""
    name = source.get("name")
    return f"set data.{name}.{key}" if name else f"set the data source's `{key}`"


# ---------------------------------------------------------------------------------------------
# Units


def source_files(source: dict) -> list[tuple[str, Path]]:
    """(stable name, path) of every unit of ``source``, sorted by name; held-out split applied."""
    kind = source.get("kind", "text")
    if kind not in READERS:
        raise ValueError(f"data kind {kind!r} is not readable by the runtime yet; use one of {', '.join(READERS)}")
    if kind == "builtin":
        return _builtin_files(source)
    if kind == "dataset":
        from . import hf

        if source.get("hub"):
            files = hf.hub_files(source, lambda key: hint(source, key))
        else:
            folders = _matches(source, dirs=True)
            files = [f for d in folders for f in hf.saved_files(d, source.get("split"), lambda key: hint(source, key))]
        return [(str(f), f) for f in files]  # the dataset's own shard order, not re-sorted
    files = [f for f in _matches(source, dirs=False) if not (kind == "tokenized" and f.name.endswith(".tmp"))]
    return [(str(f), f) for f in files]


def _matches(source: dict, *, dirs: bool) -> list[Path]:
    found = sorted({Path(p).resolve() for pattern in source.get("paths") or [] for p in glob.glob(str(pattern), recursive=True)})
    found = [f for f in found if (f.is_dir() if dirs else f.is_file())]
    if not found:
        what = "directories saved with `save_to_disk`" if dirs else "files"
        raise FileNotFoundError(f"data paths {source.get('paths')} match no {what}")
    return found


def _builtin_files(source: dict) -> list[tuple[str, Path]]:
    """The running interpreter's standard-library ``.py`` files (site-packages excluded).

    ``source["split"]`` is ``train`` (default) or ``heldout``; the split is by file, decided by
    a hash of the file's relative path, so it is stable when files are added or removed. Files
    are ordered by that hash too, not by name: sorted by name, long runs of the stream would be
    one package (``encodings/cp*.py`` is mostly hex tables), and a window would not be a sample.
    """
    if source.get("builtin") not in BUILTINS:
        raise ValueError(f"unknown builtin data {source.get('builtin')!r}; known: {', '.join(BUILTINS)}")
    split = source.get("split") or "train"
    if split not in ("train", "heldout"):
        raise ValueError(f"builtin split must be 'train' or 'heldout', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:  # third-party packages are not the standard library
            dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        dirs.sort()
        for name in files:
            if not name.endswith(".py"):
                continue
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            digest = hashlib.sha256(rel.encode()).digest()
            if (digest[0] % HELDOUT_EVERY == 0) == (split == "heldout"):
                out.append((digest, rel, path))
    return [(rel, path) for _, rel, path in sorted(out)]


# ---------------------------------------------------------------------------------------------
# Documents and records


def _skipping(source: dict, skips: Skips | None) -> bool:
    policy = source.get("on_error") or "fail"
    if policy not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {policy!r}")
    if policy == "skip" and skips is None:  # a skip nobody counts would be a silent drop
        raise ValueError("on_error: skip needs a Skips counter to record what is skipped")
    return policy == "skip"


def guarded(path: Path, source: dict, skips: Skips | None, items: Iterator) -> Iterator:
    """``items``, with each DataError either raised (fail) or counted and passed over (skip).

    ``items`` yields values or DataErrors (record-level problems); a DataError *raised* by it is
    file-level (truncated, unreadable): under skip it is counted once and the file ends there.
    """
    skip = _skipping(source, skips)
    try:
        for item in items:
            if isinstance(item, DataError):
                if not skip:
                    raise item
                skips.add(path, item)
            else:
                yield item
    except DataError as e:
        if not skip:
            raise
        skips.add(path, e)


def documents(path: Path, source: dict, skips: Skips | None = None) -> Iterator[str]:
    """Texts of one unit of ``source`` (a path from ``source_files``).

    text: the whole (decompressed) file is one document. builtin: one stdlib file. jsonl, parquet,
    dataset: the string ``field`` (default ``text``) of each record. Bad data: see ``guarded``.
    """
    kind = source.get("kind", "text")
    if kind == "builtin":  # the interpreter's own sources: a few stdlib test files are not UTF-8 on purpose
        yield Path(path).read_bytes().decode("utf-8", errors="replace")
        return
    if kind == "tokenized":
        raise ValueError(f"{shown(path)}: a tokenized source holds token ids, not text; read it with token_documents")
    if kind == "text":
        yield from guarded(path, source, skips, _text(path, source))
        return
    name = source.get("field") or "text"
    yield from guarded(path, source, skips, _texts(path, source, name))


def _text(path: Path, source: dict) -> Iterator[str | DataError]:
    raw = b"".join(formats.chunks(path))
    if not raw:
        yield DataError(f"{shown(path)}: empty file; remove it from data.{source.get('name', '<name>')}.paths")
        return
    yield formats.decode(raw, shown(path))


def _texts(path: Path, source: dict, name: str) -> Iterator[str | DataError]:
    for where, record in _records(path, source, [name]):
        if isinstance(record, DataError):
            yield record
        elif name not in record:
            yield DataError(f"{where}: no field {name!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                            f"{hint(source, 'field')}")
        elif not isinstance(record[name], str):
            what = "null" if record[name] is None else f"a {type(record[name]).__name__}"
            yield DataError(f"{where}: field {name!r} is {what}, not a string")
        else:
            yield record[name]


def records(path: Path, source: dict, skips: Skips | None = None,
            columns: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(location, record) of each record of a jsonl, parquet or dataset unit; errors as documents'."""
    if source.get("kind") not in RECORD_KINDS:
        raise ValueError(f"data kind {source.get('kind')!r} has no records; use one of {', '.join(RECORD_KINDS)}")

    def located():
        for where, record in _records(path, source, columns):
            yield record if isinstance(record, DataError) else (where, record)

    yield from guarded(path, source, skips, located())


def _records(path: Path, source: dict, columns: list[str] | None) -> Iterator[tuple[str, dict | DataError]]:
    """(location, record or the DataError of a bad record); file-level errors are raised."""
    name = str(path)
    if name.endswith((".parquet", ".arrow")):
        yield from _table_records(path, source, columns)
        return
    count, label = 0, shown(path)  # resolved once: `shown` stats the path, and a file has millions of records
    for number, raw in formats.lines(path):
        where = f"{label}:{number}"
        if not raw.strip():
            continue  # blank lines are not records
        count += 1
        try:
            record = formats.json_record(raw, where)
        except DataError as e:
            yield where, e
            continue
        if not isinstance(record, dict):
            yield where, DataError(f"{where}: record is a JSON {_json_type(record)}, not an object; "
                                   "each line must be an object such as {\"text\": ...}")
            continue
        yield where, record
    if count == 0:
        raise DataError(f"{shown(path)}: empty file (no records); remove it from data.{source.get('name', '<name>')}.paths")


def _table_records(path: Path, source: dict, columns: list[str] | None):
    names, rows = formats.table_rows(path, columns)
    if columns and (missing := [c for c in columns if c not in names]):
        key = "field"
        raise DataError(f"{shown(path)}: no column {missing[0]!r} (columns: {', '.join(names)}); {hint(source, key)}")
    count, label = 0, shown(path)
    for index, row in rows:
        count += 1
        yield f"{label}: row {index}", row
    if count == 0:
        raise DataError(f"{shown(path)}: no rows; remove it from data.{source.get('name', '<name>')}.paths")


def _json_type(value) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


# ---------------------------------------------------------------------------------------------
# Token ids (`kind: tokenized`)


def token_documents(path: Path, source: dict, skips: Skips | None = None):
    """Token ids of one ``kind: tokenized`` unit, one 1-D numpy array per document.

    ``.safetensors`` with ``doc_ends``: one array per document; otherwise the whole file is one
    document. Arrays are views of a memory map (.npy) or of the file's tensor; ids are yielded as
    stored (the stream appends EOS after each document, as it does for text).
    """
    if source.get("kind") != "tokenized":
        raise ValueError(f"data kind {source.get('kind')!r} holds text; read it with documents()")

    def arrays():
        tokens, ends = formats.token_arrays(path)
        if tokens.size == 0:
            yield DataError(f"{shown(path)}: no tokens (empty file)")
            return
        start = 0
        for end in ends if ends is not None else [tokens.size]:
            yield tokens[start:int(end)]
            start = int(end)

    yield from guarded(path, source, skips, arrays())
