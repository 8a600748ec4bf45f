"""Wall time of task accuracy (`{tasks: DATA}`) on a checkpoint of the tiny family's parent shape.

The eval stage runs this once per checkpoint, so the tiny family's 15-minute budget on 2 cores has
to hold it for every variant. This builds a random model of `specs/tiny.yaml`'s parent shape (4
layers, hidden 128, vocab 1,024; random weights: a random model rarely stops early, so every
answer runs to `max_new_tokens`, the worst case), writes the held-out prompts of the built-in
tasks as the eval stage does, and times `harness.run` at the defaults and at smaller settings.

    python benchmarks/task_accuracy.py            # 25 prompts per task, k 4 (the defaults), then 100 and k 8
    python benchmarks/task_accuracy.py --quick    # the defaults only

Prints one JSON line per setting: prompts, answers generated, seconds, answers per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(layers=4, hidden=128, ffn=384, heads=4, kv_heads=2, head_dim=32, vocab=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the defaults only: 25 prompts per task, k 4")
    args = parser.parse_args()
    import torch

    from cascadec.runtime.evaluation import harness
    from tinymodels import save_model

    torch.set_num_threads(2)
    settings = [dict(limit=25, k=4)] if args.quick else [dict(limit=25, k=4), dict(limit=100, k=8)]
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model(Path(tmp) / "model", **SHAPE)
        src = {"kind": "builtin", "builtin": "tasks", "split": "heldout", "format": "prompts", "name": "held"}
        for s in settings:
            task = {"generate": "tasks", "data": "held", "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 32,
                    "seed": 0, "batch_size": 64, **s}
            out = Path(tmp) / f"tasks-{s['limit']}-{s['k']}"
            harness.generate(task, src, out)
            started = time.perf_counter()
            row = harness.run(model, [task], include=[out], dtype="float32", device="cpu", batch_size=64,
                              log=lambda _: None)["cascadec_tasks_held"]
            seconds = time.perf_counter() - started
            prompts = int(row["prompts"])
            answers = prompts * (1 + s["k"])
            print(json.dumps({**s, "max_new_tokens": 32, "prompts": prompts, "answers": answers,
                              "seconds": round(seconds, 1), "answers_per_s": round(answers / seconds, 1),
                              "mean_length": row["length"]}), flush=True)


if __name__ == "__main__":
    main()
