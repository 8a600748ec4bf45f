"""Reading and writing Hugging Face safetensors checkpoints a few tensors at a time.

Owns file layout only: which file holds a key, shard naming and the index, side files, and the
write-to-temp-then-rename rule. It never changes a tensor's values.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DEFAULT_SHARD_BYTES = 4 * 2**30  # like the Hub's usual ~5 GB shards; memory does not depend on it


class Reader:
    """Key -> tensor over one or many safetensors files, opening each file per read.

    ``safe_open`` memory-maps a whole file and the pages it touches stay resident while it is
    open, so keeping handles open would let a prune's RSS grow to the whole checkpoint. Opening
    per read bounds it to the tensors asked for.
    """

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: model_dir / f for k, f in weight_map.items()}
        elif (model_dir / "model.safetensors").is_file():
            with safe_open(model_dir / "model.safetensors", "pt") as f:
                self.files = {k: model_dir / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")

    def keys(self) -> list[str]:
        return sorted(self.files)

    def row_chunks(self, key: str, rows: int = 4096):
        """Yield ``key`` in blocks of ``rows`` rows, reopening the file per block (see above), so
        a vocabulary-sized matrix is never resident whole."""
        with safe_open(self.files[key], "pt") as f:
            n = f.get_slice(key).get_shape()[0]
        for start in range(0, n, rows):
            with safe_open(self.files[key], "pt") as f:
                yield f.get_slice(key)[start:start + rows]

    def read(self, keys) -> dict[str, torch.Tensor]:
        """Tensors for ``keys`` (absent keys are skipped), one open per file."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k in self.files:
                by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for path, names in by_file.items():
            with safe_open(path, "pt") as f:
                out.update({k: f.get_tensor(k) for k in names})
        return out


# safetensors dtype codes (the format's spec)
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class ShardWriter:
    """Streams tensors to disk as they come, in shards of about ``max_bytes`` each.

    Written by hand because ``safetensors.torch.save_file`` serialises a whole dict at once, so
    going through it means holding a full shard in memory. The file format is small and fixed:
    an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets;
    space-padded to a multiple of 8), then the raw bytes. Tensor bytes go to a ``.data`` file as
    they arrive; ``close`` writes each shard's header and appends its data (a disk copy, no
    memory). A shard ends once it reaches ``max_bytes``; one shard is named
    ``model.safetensors``, several get transformers' names and an index.
    """

    def __init__(self, out_dir: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir, self.max_bytes = Path(out_dir), max_bytes
        self.shards: list[dict] = []  # per shard: name -> header entry
        self.data = None
        self.offset = 0
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.add_rows(key, list(tensor.shape), tensor.dtype, [tensor])

    def add_rows(self, key: str, shape: list[int], dtype: torch.dtype, chunks) -> None:
        """Write one tensor of ``shape`` from consecutive row blocks (row-major, so they append)."""
        if self.data is None or self.offset >= self.max_bytes:
            self._start()
        begin = self.offset
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise TypeError(f"{key}: block of {chunk.dtype}, tensor of {dtype}")
            raw = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self.data.write(memoryview(raw))
            self.offset += raw.nbytes
        expected = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        if self.offset - begin != expected:
            raise ValueError(f"{key}: wrote {self.offset - begin} bytes for shape {shape}, expected {expected}")
        self.shards[-1][key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, self.offset]}
        self.total_bytes += self.offset - begin

    def _start(self) -> None:
        if self.data is not None:
            self.data.close()
        self.shards.append({})
        self.data = open(self.dir / f"shard-{len(self.shards) - 1:05d}.data", "wb")
        self.offset = 0

    def _finish(self, i: int, name: str) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.shards[i]}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        data = self.dir / f"shard-{i:05d}.data"
        with open(self.dir / name, "wb") as out, open(data, "rb") as f:
            out.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(f, out, 16 * 2**20)
        data.unlink()

    def close(self) -> None:
        """Name the shards as transformers expects and write the index when there are several."""
        if self.data is None:
            self._start()
        self.data.close()
        n = len(self.shards)
        if n == 1:
            self._finish(0, "model.safetensors")
            return
        weight_map = {}
        for i, entries in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._finish(i, name)
            weight_map.update({k: name for k in entries})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation and processor files: every top-level file that is not weights
    or ``config.json`` (which the caller rewrites)."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        is_weights = path.suffix == ".safetensors" or path.name in WEIGHT_FILES
        if path.is_file() and not is_weights and path.name != "config.json":
            shutil.copy2(path, Path(dst) / path.name)
            copied.append(path.name)
    return copied


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
    """Yield a temp directory beside ``out_dir``; rename it into place only on success.

    On any error the temp directory is removed, so a failed run leaves no partial output.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out_dir)
