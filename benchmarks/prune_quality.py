"""Benchmark: what each pruning choice costs a trained, tied-embedding Llama (not a timed test).

Builds the model the tests build (tests/tinymodels.trained_model: a SmolLM-like Llama, tied
embeddings, norm gains spread around 1 and partly negative, trained on stdlib text), then cuts it
along every axis with every method and measures, side by side in one run:

- held-out perplexity on the interpreter's held-out stdlib files (the runtime's split);
- KL(source ‖ pruned) on the same held-out tokens (full vocabulary);
- the reconstruction KL every prune records in its report (calibration text, top-64 + rest).

Rows include the previous tied-head rule (``pca, diagonal gain``: the basis of the PCA itself
and the diagonal of Qᵀ·diag(g)·Q as the final norm) and, for reference, the same checkpoint
untied first (bigger: the head is a second matrix). Output: a markdown table (docs/pruning.md).

Run: .venv/bin/python benchmarks/prune_quality.py [WORKDIR] [--steps N] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tinymodels  # noqa: E402
from cascadec.runtime.surgery import adapters  , calibrate, keep# noqa: E402
from cascadec.runtime.surgery.prune import prune  # noqa: E402
from cascadec.shapes import from_hf_config  # noqa: E402

# SmolLM-135M's proportions (9 query / 3 KV heads of 64 -> 3 / 1 here), scaled to train in minutes.
SHAPE = dict(layers=8, hidden=192, ffn=384, heads=3, kv_heads=1, head_dim=64, vocab=1024)
CALIBRATION = dict(samples=32, seq_len=128)
HELD_OUT_TOKENS = 8192


def diagonal_gain(u: torch.Tensor, g: torch.Tensor):
    """The previous tied-head rule: PCA's own basis, final norm = diag(Qᵀ·diag(g)·Q)."""
    return u, (u.double().pow(2) * g.double()[:, None]).sum(0).float()


def untie(src: Path, out: Path) -> Path:
    """A copy of ``src`` with the LM head stored as its own matrix (equal to the embedding)."""
    out.mkdir()
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@torch.no_grad()
def held_out(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """[tokens, V] float64 next-token log-probs on ``ids`` [n, S]."""
    model = adapters.load_model(model_dir, dtype=torch.float32)
    return torch.cat([torch.log_softmax(model(input_ids=row[None]).logits[0, :-1].double(), -1) for row in ids])


def main(argv: list[str]) -> int:
    args = argparse.ArgumentParser()
    args.add_argument("work", nargs="?", type=Path)
    args.add_argument("--steps", type=int, default=500)
    args.add_argument("--batch", type=int, default=8)
    args = args.parse_args(argv)
    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="prune-quality-"))
    t = time.perf_counter()
    src = work / "model"
    if not (src / "config.json").exists():
        tinymodels.trained_model(src, "llama", tied=True, steps=args.steps, batch=args.batch, seq_len=128, lr=3e-3,
                                 train_chars=2_000_000, **SHAPE)
    print(f"trained in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    final = load_file(src / "model.safetensors")["model.norm.weight"]
    (work / "calibration.txt").write_text(tinymodels.stdlib_text("train", 400_000))
    source = {"kind": "text", "paths": [str(work / "calibration.txt")]}
    untied = untie(src, work / "untied") if not (work / "untied").exists() else work / "untied"
    stats = {m: calibrate.calibrate(m, source=source, progress=False, **CALIBRATION)[0] for m in (src, untied)}
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tok(tinymodels.stdlib_text("heldout", 200_000), add_special_tokens=False)["input_ids"])
    ids = ids[:HELD_OUT_TOKENS].view(-1, 256)
    labels = ids[:, 1:].reshape(-1)
    base = held_out(src, ids)
    s = from_hf_config(adapters.read_config(src))
    L, d, f = s.layers, s.hidden, s.ffn
    small = d - s.heads * max(1, round(0.02 * d / s.heads))  # ~2%, a multiple of the heads (llama)
    narrow = d - d // 8
    rows = [
        ("keep all", src, {}, {}, None),
        *[(f"layers {L} -> {L - 2}, `{m}`", src, {"layers": L - 2}, {"layers": m}, None)
          for m in ("norm_ratio", "block_influence", "angular")],
        (f"FFN {f} -> {f * 2 // 3}, `activation`", src, {"ffn": f * 2 // 3}, {"ffn": "activation"}, None),
    ]
    for k in (small, narrow):
        rows += [(f"hidden {d} -> {k}, `pca` (gain-aligned basis)", src, {"hidden": k}, {"hidden": "pca"}, None),
                 (f"hidden {d} -> {k}, `pca`, previous diagonal-gain rule", src, {"hidden": k}, {"hidden": "pca"},
                  diagonal_gain),
                 (f"hidden {d} -> {k}, `channel`", src, {"hidden": k}, {"hidden": "channel"}, None)]
    both = {"layers": L - 2, "hidden": narrow, "ffn": f * 2 // 3}
    for m in ("pca", "channel"):
        rows.append((f"layers {L - 2} + hidden {narrow} + FFN {f * 2 // 3}, `{m}`", src, both,
                     {"layers": "block_influence", "hidden": m, "ffn": "activation"}, None))
    for k in (small, narrow):
        rows.append((f"untied first, hidden {d} -> {k}, `pca`", untied, {"hidden": k}, {"hidden": "pca"}, None))
    print(f"| cut | params | held-out perplexity | held-out KL | calibration KL (report) |\n|---|---:|---:|---:|---:|")
    base_ppl = float(torch.exp(-base.gather(1, labels[:, None]).mean()))
    for i, (name, model, axes, methods, rule) in enumerate(rows):
        out = work / f"cut{i}"
        shape = from_hf_config(adapters.read_config(model)).replace(**axes)
        saved = keep.aligned_to_gain
        if rule is not None:
            keep.aligned_to_gain = rule
        try:
            report = prune(model, out, stats=stats[model], target=shape, methods=methods, log=lambda m: None,
                           warn_kl=float("inf"))
        finally:
            keep.aligned_to_gain = saved
        logp = held_out(out, ids)
        ppl = float(torch.exp(-logp.gather(1, labels[:, None]).mean()))
        kl = float((base.exp() * (base - logp)).sum(-1).mean())
        print(f"| {name} | {report['params'] / 1e6:.2f}M | {ppl:.2f} | {kl:.4f} | "
              f"{report['reconstruction']['kl']:.4f} |", flush=True)
    print(f"\nsource: {s.layers} layers, hidden {d}, FFN {f}, heads {s.heads}/{s.kv_heads}, vocab {s.vocab}, tied; "
          f"final-norm gains {float(final.min()):.2f} to {float(final.max()):.2f} (std {float(final.std()):.2f}); "
          f"held-out perplexity {base_ppl:.2f} on {len(labels):,} tokens; calibration "
          f"{CALIBRATION['samples']}x{CALIBRATION['seq_len']} tokens; {time.perf_counter() - t:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
