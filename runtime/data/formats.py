"""File formats under the readers: decompression, jsonl records, table batches, token arrays.

Owns turning one file's bytes into raw records with their location, and the located errors of a
file that cannot be read (``DataError``). It must not know about data sources, specs or tokenizers;
readers.py decides what a record means.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20  # bytes per read from a (compressed) file
ROWS = 4096  # rows per table batch: bounded memory whatever the file size


class DataError(ValueError):
    """Bad data, located: the message starts with the file and, when known, the record."""


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (as users typed it)."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


def compression(path: Path) -> str | None:
    name = Path(path).name
    return "gzip" if name.endswith(".gz") else "zstd" if name.endswith(".zst") else None


def chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed (``.gz``, ``.zst``), in chunks of about ``CHUNK`` bytes.

    A compressed file that ends before its end-of-stream marker (a truncated copy or download)
    raises DataError; zstandard's stream reader would end silently, so frames are checked here.
    """
    kind = compression(path)
    with open(path, "rb") as f:
        if kind is None:
            while block := f.read(CHUNK):
                yield block
        elif kind == "gzip":
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    while block := g.read(CHUNK):
                        yield block
            except EOFError:
                raise DataError(f"{shown(path)}: truncated gzip file (it ends before the end-of-stream marker); "
                                "copy or download it again") from None
            except (gzip.BadGzipFile, zlib.error) as e:
                raise DataError(f"{shown(path)}: not a valid gzip file ({e})") from None
        else:
            yield from _zstd_chunks(path, f)


def _zstd_chunks(path: Path, f) -> Iterator[bytes]:
    import zstandard

    new = zstandard.ZstdDecompressor().decompressobj  # one object decodes one frame
    decoder, fed = new(), False
    try:
        block = f.read(CHUNK)
        while block:
            out = decoder.decompress(block)
            fed = True
            if out:
                yield out
            if decoder.eof:  # end of a frame; concatenated frames continue with a fresh decoder
                block, (decoder, fed) = decoder.unused_data, (new(), False)
                if block:
                    continue
            block = f.read(CHUNK)
    except zstandard.ZstdError as e:
        raise DataError(f"{shown(path)}: not a valid zstd file ({e})") from None
    if fed and not decoder.eof:
        raise DataError(f"{shown(path)}: truncated zstd file (its last frame is incomplete); copy or download it again")


def lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) of a possibly compressed file."""
    number, rest = 0, b""
    for block in chunks(path):
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            yield number, part
    if rest:
        yield number + 1, rest


def decode(raw: bytes, where: str) -> str:
    """``raw`` as strict UTF-8, or a DataError saying where the first bad byte is."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        at = f"column {column}" if line == 1 else f"line {line}, column {column}"
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at {at}); "
                        "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def json_record(raw: bytes, where: str):
    """One jsonl line parsed (any JSON value; the caller checks that it is an object)."""
    try:
        return json.loads(decode(raw, where))
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


# ---------------------------------------------------------------------------------------------
# Tables: parquet files and the arrow files of `datasets.save_to_disk`


def table_batches(path: Path, columns: list[str] | None):
    """(column names, iterator of pyarrow RecordBatches of ``columns``) of a parquet or arrow file.

    Parquet is read row group by row group (``ROWS`` rows at a time); arrow files (the IPC
    stream format `datasets` writes) are memory-mapped. Missing columns are the caller's to
    report, so the schema is returned before any row is read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if str(path).endswith(".parquet"):
            pf = pq.ParquetFile(path)
            names = list(pf.schema_arrow.names)
            wanted = [c for c in columns if c in names] if columns else None
            return names, pf.iter_batches(batch_size=ROWS, columns=wanted)
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        names = list(reader.schema.names)
        return names, iter(reader)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{shown(path)}: cannot read it as {'parquet' if str(path).endswith('.parquet') else 'arrow'} ({e})") from None


def table_rows(path: Path, columns: list[str] | None) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """(column names, iterator of (0-based row index, {column: value})) of a table file."""
    import pyarrow as pa

    names, batches = table_batches(path, columns)

    def rows():
        index = 0
        try:
            for batch in batches:
                if columns:
                    batch = batch.select([c for c in columns if c in batch.schema.names])
                for row in batch.to_pylist():
                    yield index, row
                    index += 1
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{shown(path)}: row {index}: cannot read the file further ({e}); "
                            "it may be truncated") from None

    return names, rows()


# ---------------------------------------------------------------------------------------------
# Token files (`kind: tokenized`)

TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")


def token_arrays(path: Path):
    """(tokens, doc_ends or None) of a token file, both 1-D numpy arrays; tokens memory-mapped.

    ``.npy``: one 1-D integer array, memory-mapped. ``.safetensors``: a ``tokens`` tensor and
    optionally ``doc_ends`` (int64, the exclusive end offset of each document, increasing, the
    last equal to the token count).
    """
    import numpy as np

    where = shown(path)
    if str(path).endswith(".npy"):
        try:
            tokens, ends = np.load(path, mmap_mode="r", allow_pickle=False), None
        except (ValueError, OSError) as e:
            raise DataError(f"{where}: not a readable .npy array ({e})") from None
    elif str(path).endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "np") as f:
                keys = set(f.keys())
                if "tokens" not in keys:
                    raise DataError(f"{where}: no 'tokens' tensor (tensors: {', '.join(sorted(keys)) or 'none'}); "
                                    "a tokenized file holds `tokens` and optionally `doc_ends`")
                tokens = f.get_tensor("tokens")
                ends = f.get_tensor("doc_ends") if "doc_ends" in keys else None
        except SafetensorError as e:
            raise DataError(f"{where}: not a readable safetensors file ({e})") from None
    else:
        raise DataError(f"{where}: a tokenized source reads .npy or .safetensors files")
    if tokens.ndim != 1 or str(tokens.dtype) not in TOKEN_DTYPES:
        raise DataError(f"{where}: tokens are {tokens.dtype} of shape {tuple(tokens.shape)}; "
                        f"expected a 1-D array of {', '.join(TOKEN_DTYPES)}")
    if ends is not None:
        ends = ends.astype("int64")
        if ends.ndim != 1 or (ends.size and (ends[-1] != tokens.size or (np.diff(ends, prepend=0) < 0).any())):
            raise DataError(f"{where}: doc_ends must increase and end at the token count {tokens.size}")
    return tokens, ends
