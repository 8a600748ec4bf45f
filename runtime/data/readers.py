"""Data sources: which files a plan data source names, in a deterministic order, and the documents inside them.

Owns reading only (no tokenisation, no torch); token streams are stream.py's.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

READERS = ("text", "jsonl", "builtin")
BUILTINS = ("stdlib",)
HELDOUT_EVERY = 20  # the stdlib's held-out split: files whose path hash is 0 mod 20 (~5 %)



def source_files(source: dict) -> list[tuple[str, Path]]:
    """(stable name, path) of every file of ``source``, sorted by name; held-out split applied."""
    kind = source.get("kind", "text")
    if kind not in READERS:
        raise ValueError(f"data kind {kind!r} is not readable by the runtime yet; use one of {', '.join(READERS)}")
    if kind == "builtin":
        return _builtin_files(source)
    files = sorted({Path(p).resolve() for pattern in source.get("paths") or [] for p in glob.glob(str(pattern), recursive=True)})
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(f"data paths {source.get('paths')} match no files")
    return [(str(f), f) for f in files]


def _builtin_files(source: dict) -> list[tuple[str, Path]]:
    """The running interpreter's standard-library ``.py`` files (site-packages excluded).

    ``source["split"]`` is ``train`` (default) or ``heldout``; the split is by file, decided by
    a hash of the file's relative path, so it is stable when files are added or removed. Files
    are ordered by that hash too, not by name: sorted by name, long runs of the stream would be
    one package (``encodings/cp*.py`` is mostly hex tables), and a window would not be a sample.
    """
    if source.get("builtin") not in BUILTINS:
        raise ValueError(f"unknown builtin data {source.get('builtin')!r}; known: {', '.join(BUILTINS)}")
    split = source.get("split", "train")
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


def documents(path: Path, source: dict) -> Iterator[str]:
    """Texts of one unit of ``source`` (a file from ``source_files``): the whole file (text,
    builtin) or the ``field`` of each jsonl record."""
    kind, field = source.get("kind", "text"), source.get("field") or "text"
    raw = path.read_bytes().decode("utf-8", errors="replace")
    if kind != "jsonl":
        yield raw
        return
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if field not in record:
            raise KeyError(f"{path}:{number}: record has no field {field!r} (fields: {', '.join(record)})")
        yield record[field]
