"""Benchmark: peak memory of pruning and the cost of calibration hooks (not a timed test).

Builds a ~1 GB random Mistral checkpoint (float32, sharded safetensors), then side by side:
- calibration (all scores, one pass) against one plain forward over the same batches;
- pruning it in a subprocess (PCA hidden, layers, FFN), peak RSS against the checkpoint size,
  next to the RSS of a subprocess that only imports the same modules.

Run: .venv/bin/python benchmarks/prune_memory.py [WORKDIR]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from cascadec.runtime.surgery.calibrate import SCORES, collect, save

SHAPE = dict(vocab_size=32768, hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)
TARGET = dict(layers=12, hidden=768, ffn=2560)
SAMPLES, SEQ_LEN, BATCH = 8, 256, 4

PRUNE = """
import sys, json
from pathlib import Path
from cascadec.runtime.surgery.prune import prune
from cascadec.runtime.surgery.calibrate import load
from cascadec.runtime.surgery.adapters import read_config
from cascadec.shapes import from_hf_config
src, out = Path(sys.argv[1]), Path(sys.argv[2])
if out.name != "baseline":
    target = from_hf_config(read_config(src)).replace(**json.loads(sys.argv[3]))
    prune(src, out, stats=load(src.parent / "stats"), target=target,
          methods={"layers": "block_influence", "hidden": "pca", "ffn": "activation"}, log=lambda m: None)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def build(path: Path) -> int:
    torch.manual_seed(0)
    model = tf.MistralForCausalLM(tf.MistralConfig(**SHAPE)).eval()
    model.save_pretrained(path, max_shard_size="300MB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def time_calibration(path: Path) -> tuple[float, float]:
    """(seconds of plain forwards, seconds of calibrated forwards), best of two alternations."""
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    plain, hooked = [], []
    for _ in range(2):
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, SAMPLES, BATCH):
                model.model(input_ids=ids[i:i + BATCH], use_cache=False)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        stats = collect(model.model, ids, batch_size=BATCH, scores=SCORES, progress=False)
        hooked.append(time.perf_counter() - t)
    save(stats, {}, path.parent / "stats")
    return min(plain), min(hooked)


def peak_rss(src: Path, out: Path) -> int:
    """Peak RSS in bytes of a subprocess that prunes ``src`` into ``out`` (or only imports)."""
    import json

    done = subprocess.run([sys.executable, "-c", PRUNE, str(src), str(out), json.dumps(TARGET)],
                          check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) * 1024  # VmHWM is in kB


def main(argv: list[str]) -> int:
    work = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="prune-bench-"))
    src = work / "src"
    size = build(src)
    plain, hooked = time_calibration(src)
    baseline = peak_rss(src, work / "baseline")
    t = time.perf_counter()
    peak = peak_rss(src, work / "pruned")
    prune_s = time.perf_counter() - t
    gib = 2**30
    rows = [
        ("checkpoint (float32, sharded)", f"{size / gib:.2f} GiB", ""),
        ("prune peak RSS", f"{peak / gib:.2f} GiB", f"{peak / size:.2f}x checkpoint (target < 0.6x)"),
        ("  of which imports only", f"{baseline / gib:.2f} GiB", f"{baseline / size:.2f}x"),
        ("  prune working set", f"{(peak - baseline) / gib:.2f} GiB", f"{(peak - baseline) / size:.2f}x"),
        ("prune wall time", f"{prune_s:.1f} s", ""),
        ("plain forward", f"{plain:.2f} s", f"{SAMPLES}x{SEQ_LEN} tokens, batch {BATCH}"),
        ("calibration (all scores)", f"{hooked:.2f} s", f"{hooked / plain:.2f}x forward (target < 1.3x)"),
    ]
    for name, value, note in rows:
        print(f"{name:32s} {value:>10s}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
