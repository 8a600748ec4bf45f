"""Shared helpers of the surgery tests: tiny checkpoints edited in place, logits, stats, counts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tinymodels

import tinymodels  # noqa: E402
from cascadec.runtime.surgery import adapters  , calibrate# noqa: E402
from cascadec.shapes import from_hf_config  # noqa: E402

FAMILIES = ("llama", "mistral", "ministral3", "qwen2", "qwen3", "mistral3")
ALL_METHODS = {"layers": "block_influence", "hidden": "pca", "ffn": "activation", "heads": "importance"}


def edit(model_dir: Path, fn) -> Path:
    """Apply ``fn(tensors: dict)`` to a single-file checkpoint in place."""
    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(model_dir)


def random_norms(tensors: dict, seed: int = 1) -> None:
    """RMSNorm gains like a trained model's: spread around 1, some negative (a real 135M Llama's
    final norm runs from -2.1 to 3.3), so folding and tied heads are really exercised."""
    g = torch.Generator().manual_seed(seed)
    for key, t in tensors.items():
        if key.endswith("norm.weight") and "vision" not in key and "projector" not in key:
            t.copy_(1.0 + 0.8 * torch.randn(t.shape, generator=g))


def to_bf16(model_dir: Path) -> Path:
    """Store a checkpoint's weights in bfloat16, as most released checkpoints are."""
    import json

    edit(model_dir, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    (Path(model_dir) / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2))
    return Path(model_dir)


def model(tmp: Path, family: str = "mistral", *, tied: bool = False, norms: bool = True, bf16: bool = False,
          **axes) -> Path:
    """A tiny random checkpoint with random norm gains (unless ``norms`` is False), in bfloat16
    when ``bf16``."""
    path = tinymodels.save_model(Path(tmp) / f"{family}-{'tied' if tied else 'untied'}", family, tied=tied, **axes)
    path = edit(path, random_norms) if norms else path
    return to_bf16(path) if bf16 else path


def shape(model_dir: Path):
    return from_hf_config(adapters.read_config(model_dir))


def text_source(tmp: Path, repeat: int = 4) -> dict:
    """A calibration text file (the tokenizer's own corpus; scanning the stdlib is slower)."""
    path = Path(tmp) / "calibration.txt"
    path.write_text(tinymodels.TEXT * repeat)
    return {"kind": "text", "paths": [str(path)], "field": "text"}


def stats(model_dir: Path, samples: int = 4, seq_len: int = 32) -> dict:
    source = text_source(Path(model_dir).parent)
    return calibrate.calibrate(model_dir, source=source, samples=samples, seq_len=seq_len, progress=False)[0]


def ids(n: int = 2, length: int = 24, seed: int = 0, vocab: int = tinymodels.TINY["vocab"]) -> torch.Tensor:
    return torch.randint(4, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    return adapters.load_model(model_dir, dtype=torch.float32)(input_ids=tokens).logits


@torch.no_grad()
def loss(model_dir: Path, tokens: torch.Tensor) -> float:
    """Next-token cross-entropy of ``tokens``."""
    return float(adapters.load_model(model_dir, dtype=torch.float32)(input_ids=tokens, labels=tokens).loss)


def text_params(model_dir: Path) -> int:
    """Parameters of the loaded text decoder and head (tied weights counted once)."""
    m = adapters.load_model(model_dir, dtype=torch.float32)
    skip = ("vision_tower", "multi_modal_projector")
    return sum(p.numel() for n, p in m.named_parameters() if not any(s in n for s in skip))
