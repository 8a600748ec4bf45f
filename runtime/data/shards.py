"""Token shards on disk: tokenise a data source's files (sharded over processes, resumable per
file) and read the concatenated stream back by offset with constant memory. No torch here.

Layout of a shard folder (the `tokens` output of a `tokenize` stage, or a cache entry)::

    index.json          format, dtype, eos, tokenizer sha256, and per file, in reading order:
                        {name, shard, tokens, documents}
    000000.bin          the file's tokens, raw little-endian uint16 (vocab <= 65536) or uint32,
                        each document followed by EOS
    000000.docs.bin     int64 end offsets of its documents (document boundaries)
    000000.mask.bin     chat sources only: one uint8 per token, 1 where the token is trained
                        (assistant content and its end of turn, `chat.py`); the index says `chat: true`

A chat source (`format: chat`) is rendered with the tokenizer's chat template, one document per
conversation, and *no* EOS is appended: the template already ends each assistant turn with its
end-of-turn token, and the sft stage packs whole conversations by these boundaries (packing.py).

One shard per source file: the file is the unit of sharding (process r of w takes files
r, r+w, ...) and of resume (a shard is renamed into place only when whole, next to a small
`.json` receipt naming the source file, its size and mtime), so 1 and N processes write the
same bytes. Raw arrays rather than `.npy`: a shard is appended batch by batch and its length is
known only at the end; `numpy.memmap` reads it back with the index's dtype and count.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .readers import Skips, documents, token_documents

FORMAT = 1
INDEX = "index.json"
BATCH_DOCS = 1024  # documents per `encode_batch` call: the tokenizer's threads share a batch
COPY_TOKENS = 1 << 22  # ids copied per slice from a `tokenized` file
OPEN_SHARDS = 64  # memory maps kept open by a reader (least recently used are closed)


def dtype_for(vocab: int) -> np.dtype:
    return np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<u4")


def _receipt(path: Path, stable: str) -> dict:
    st = Path(path).stat()
    return {"name": stable, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of a batch of documents with the fast (Rust) tokenizer, no special tokens.

    `encode_batch_fast` (no offsets) when the installed `tokenizers` has it; the Rust side runs
    the batch on its own threads (``TOKENIZERS_PARALLELISM``/``RAYON_NUM_THREADS``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: correct, only slower
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _prefetched(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    """Batches of ``size`` documents, the next one read and parsed on a thread while the caller
    encodes the current one: the Rust encoder releases the GIL, so parsing JSON (Python) and
    encoding overlap instead of leaving the encoder's cores idle between batches. One batch ahead,
    so memory stays two batches; a reader's error surfaces at the batch it belongs to."""
    with ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
        pending = pool.submit(lambda: list(itertools.islice(texts, size)))
        while batch := pending.result():
            pending = pool.submit(lambda: list(itertools.islice(texts, size)))
            yield batch


def tokenize_file(path: Path, stable: str, source: dict, tokenizer, eos: int, dtype: np.dtype,
                  shard: Path, rank: int = 0) -> dict:
    """Tokenise one source file into ``shard`` (+ `.docs.bin`, + `.json` receipt); return the
    receipt {name, size, mtime_ns, tokens, documents, rank, skipped, skip_reasons}. Memory: one
    batch of documents. A `tokenized` source's ids are copied (EOS appended), not encoded; bad
    records fail or, under `on_error: skip`, are counted (the readers' rule)."""
    receipt, skips = _receipt(path, stable), Skips()
    if is_chat(source):
        return _tokenize_chat(path, stable, source, tokenizer, dtype, shard, rank, receipt, skips)
    tokenized = source.get("kind") == "tokenized"
    texts = token_documents(path, source, skips) if tokenized else documents(path, source, skips)
    limit = np.iinfo(dtype).max
    tmp = shard.with_name(shard.name + f".tmp{os.getpid()}")
    docs_tmp = shard.with_name(shard.stem + f".docs.bin.tmp{os.getpid()}")
    tokens = ndocs = 0
    with open(tmp, "wb") as out, open(docs_tmp, "wb") as ends:
        texts = iter(texts)
        for doc in texts if tokenized else ():  # ids already: copied in slices (a document may be huge)
            for lo in range(0, len(doc), COPY_TOKENS):
                part = np.asarray(doc[lo:lo + COPY_TOKENS])
                if part.size and (int(part.max()) > limit or int(part.min()) < 0):
                    raise ValueError(f"{stable}: token id {int(part.max())} does not fit {dtype.name}")
                part.astype(dtype).tofile(out)
            np.array([eos], dtype=dtype).tofile(out)
            tokens += len(doc) + 1
            np.array([tokens], dtype="<i8").tofile(ends)
            ndocs += 1
        for batch in _prefetched(texts, BATCH_DOCS):
            ids = _encode(tokenizer, batch)
            lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                               dtype=np.int64, count=int(lengths.sum()))
            if flat.size and int(flat.max()) > limit:
                raise ValueError(f"{stable}: token id {int(flat.max())} does not fit {dtype.name}")
            flat.astype(dtype).tofile(out)
            (tokens + np.cumsum(lengths)).astype("<i8").tofile(ends)
            tokens += int(lengths.sum())
            ndocs += len(ids)
    os.replace(docs_tmp, shard.with_name(shard.stem + ".docs.bin"))
    os.replace(tmp, shard)
    receipt.update(tokens=tokens, documents=ndocs, rank=rank, skipped=skips.total, skip_reasons=skips.first)
    _write_json(shard.with_suffix(".json"), receipt)
    return receipt


def is_chat(source: dict) -> bool:
    """A chat source is stored as conversations with an assistant mask, not as plain documents."""
    return source.get("format") == "chat"


def _tokenize_chat(path: Path, stable: str, source: dict, tokenizer, dtype: np.dtype, shard: Path, rank: int,
                   receipt: dict, skips: Skips) -> dict:
    """`tokenize_file` for a chat source: each conversation's ids and assistant mask (`chat.encode`),
    one document per conversation, no EOS appended (the template ends each assistant turn)."""
    from .chat import examples

    limit = np.iinfo(dtype).max
    paths = {k: shard.with_name(shard.stem + suffix + f".tmp{os.getpid()}")
             for k, suffix in (("ids", ".bin"), ("docs", ".docs.bin"), ("mask", ".mask.bin"))}
    tokens = ndocs = 0
    with open(paths["ids"], "wb") as out, open(paths["docs"], "wb") as ends, open(paths["mask"], "wb") as masks:
        for example in examples(path, source, tokenizer, skips):
            ids = np.asarray(example.ids, dtype=np.int64)
            if ids.size and int(ids.max()) > limit:
                raise ValueError(f"{stable}: token id {int(ids.max())} does not fit {dtype.name}")
            ids.astype(dtype).tofile(out)
            np.asarray(example.mask, dtype=np.uint8).tofile(masks)
            tokens += ids.size
            np.array([tokens], dtype="<i8").tofile(ends)
            ndocs += 1
    for k, suffix in (("docs", ".docs.bin"), ("mask", ".mask.bin"), ("ids", ".bin")):  # the shard itself last
        os.replace(paths[k], shard.with_name(shard.stem + suffix))
    receipt.update(tokens=tokens, documents=ndocs, rank=rank, skipped=skips.total, skip_reasons=skips.first)
    _write_json(shard.with_suffix(".json"), receipt)
    return receipt


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _done(shard: Path, path: Path, stable: str) -> dict | None:
    """The receipt of a finished shard of this very file (same name, size and mtime), else None."""
    try:
        receipt = json.loads(shard.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    same = {k: receipt.get(k) for k in ("name", "size", "mtime_ns")} == _receipt(path, stable)
    return receipt if same and shard.is_file() else None


def tokenize(files: list[tuple[str, Path]], source: dict, tokenizer, work: Path, *, rank: int = 0,
             world: int = 1, log: Callable[[str], None] = print, progress: bool = True,
             need: int | None = None) -> list[dict]:
    """Tokenise this process's files (``files[rank::world]``) into ``work``; skip those already
    done. Returns their receipts. A progress bar shows MB read and tokens/s (rank 0).

    ``need`` (one process only): stop after the first files that hold that many tokens."""
    if need is not None and world != 1:
        raise ValueError("tokenising only as far as needed is for one process")
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; documents could not be separated")
    dtype = dtype_for(len(tokenizer))
    work.mkdir(parents=True, exist_ok=True)
    mine = list(enumerate(files))[rank::world]
    bar = tqdm(total=sum(p.stat().st_size for _, (_, p) in mine), unit="B", unit_scale=True,
               desc=f"tokenize (rank {rank}/{world})", disable=not progress or rank != 0, mininterval=1.0)
    receipts, fresh_tokens, started, skipped = [], 0, time.perf_counter(), 0
    with bar:
        for i, (stable, path) in mine:
            if need is not None and sum(r["tokens"] for r in receipts) >= need:
                break
            shard = work / f"{i:06d}.bin"
            receipt = _done(shard, path, stable)
            if receipt is None:
                receipt = tokenize_file(path, stable, source, tokenizer, eos, dtype, shard, rank)
                fresh_tokens += receipt["tokens"]
            else:
                skipped += 1
            receipts.append(receipt)
            bar.update(receipt["size"])
            bar.set_postfix_str(f"{fresh_tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")
    if skipped:
        log(f"tokenize: rank {rank}: {skipped} of {len(mine)} files already tokenised (resumed)")
    return receipts


def receipts(files: list[tuple[str, Path]], work: Path) -> list[dict | None]:
    """The receipt of each file's finished shard in ``work`` (None where there is none)."""
    return [_done(work / f"{i:06d}.bin", path, stable) for i, (stable, path) in enumerate(files)]


def finish(files: list[tuple[str, Path]], work: Path, out: Path, *, vocab: int, eos: int,
           tokenizer_sha256: str, chat: bool = False) -> dict:
    """Move every file's shard from ``work`` into ``out`` (in file order; nothing moves when they
    are one folder) and write `index.json` over them (``chat``: the shards carry assistant masks)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (stable, path) in enumerate(files):
        shard = work / f"{i:06d}.bin"
        receipt = _done(shard, path, stable)
        if receipt is None:
            raise RuntimeError(f"{stable}: no finished shard in {work} (a process did not finish its files)")
        suffixes = (".bin", ".docs.bin", *((".mask.bin",) if chat else ()))
        for suffix in suffixes if Path(out).resolve() != Path(work).resolve() else ():
            os.replace(work / f"{i:06d}{suffix}", out / f"{i:06d}{suffix}")
        entries.append({"name": stable, "shard": f"{i:06d}", "tokens": receipt["tokens"],
                        "documents": receipt["documents"], "skipped": receipt.get("skipped", 0)})
    index = {"format": FORMAT, "dtype": dtype_for(vocab).name, "eos": eos, "vocab": vocab,
             "tokenizer_sha256": tokenizer_sha256, "tokens": sum(e["tokens"] for e in entries),
             "documents": sum(e["documents"] for e in entries), "files": entries, **({"chat": True} if chat else {})}
    _write_json(out / INDEX, index)
    return index


class Shards:
    """The concatenated token stream of a shard folder, read by offset.

    ``read(start, end)`` finds the first shard by bisection over the cumulative token counts
    (O(log files)) and slices memory maps (constant memory; the OS pages tokens in and out)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.folder}: not a token shard folder ({e}); rerun its tokenize stage") from None
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: shard format {self.index.get('format')} (this runtime reads {FORMAT}); "
                             "rerun its tokenize stage")
        self.dtype = np.dtype(self.index["dtype"])
        self.files = self.index["files"]
        self.starts = [0, *itertools.accumulate(f["tokens"] for f in self.files)]
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def _map(self, i: int, suffix: str = ".bin") -> np.ndarray:
        key = (i, suffix)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        n = self.files[i]["tokens"]
        dtype = self.dtype if suffix == ".bin" else np.dtype(np.uint8)
        path = self.folder / f"{self.files[i]['shard']}{suffix}"
        arr = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)
        self._maps[key] = arr
        if len(self._maps) > OPEN_SHARDS:
            self._maps.popitem(last=False)
        return arr

    def read(self, start: int, end: int, suffix: str = ".bin") -> np.ndarray:
        """Tokens [start, end) of the stream as int64 (``suffix=".mask.bin"``: their assistant mask)."""
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"stream has {len(self):,} tokens; asked for [{start:,}, {end:,})")
        out = np.empty(end - start, dtype=np.int64)
        i, pos = bisect.bisect_right(self.starts, start) - 1, start
        while pos < end:
            lo = pos - self.starts[i]
            hi = min(end, self.starts[i + 1]) - self.starts[i]
            out[pos - start: pos - start + hi - lo] = self._map(i, suffix)[lo:hi]
            pos += hi - lo
            i += 1
        return out

    @property
    def chat(self) -> bool:
        """The shards of a chat source: conversations with an assistant mask (`mask`)."""
        return bool(self.index.get("chat"))

    def mask(self, start: int, end: int) -> np.ndarray:
        """The assistant mask (1 = trained) of tokens [start, end) of a chat source, as int64."""
        if not self.chat:
            raise ValueError(f"{self.folder}: not the shards of a chat source (no assistant mask)")
        return self.read(start, end, ".mask.bin")

    def document_ends(self) -> np.ndarray:
        """Stream end offset of every document, in order (int64): one conversation each for chat."""
        parts = []
        for i, f in enumerate(self.files):
            path = self.folder / f"{f['shard']}.docs.bin"
            ends = np.fromfile(path, dtype="<i8") if f["documents"] else np.empty(0, np.int64)
            parts.append(ends.astype(np.int64) + self.starts[i])
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def file_tokens(self) -> dict[str, int]:
        return {f["name"]: f["tokens"] for f in self.files}
