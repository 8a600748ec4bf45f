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
from safetensors.torch import save_file

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DEFAULT_SHARD_BYTES = 512 * 2**20


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


class ShardWriter:
    """Writes tensors into shards of at most ``max_bytes`` (one shard: ``model.safetensors``)."""

    def __init__(self, out_dir: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir, self.max_bytes = Path(out_dir), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.dir / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as transformers expects and write the index when there are several."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.dir / "shard-00000.tmp", self.dir / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / name)
            weight_map.update({k: name for k in keys})
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
