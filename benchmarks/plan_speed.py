"""How fast `cascadec plan` is: start-up cost against a bare interpreter, and growth with family size.

    python benchmarks/plan_speed.py [--runs 15] [--repeats 3] [--sizes 50,100,200,400]

1. `cascadec plan specs/ministral3.yaml` against `python -c pass`, run as subprocesses and
   interleaved (bare, plan, bare, plan, ...) so both see the same machine load; medians, the
   absolute plan cost (plan - bare) and the ratio. Target: the plan costs under 0.3 s.
2. In-process `compile_file` on generated chained cascades of 50 to 400 children (each child cut
   from the previous child's short phase, two distillation phases and an SFT variant), best of a
   few repeats; a least-squares line through the points gives the per-child time, and the growth
   from the smallest to the largest family is compared with what a linear pass would give.
   Target: linear.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 0.3


def _command() -> list[str]:
    script = shutil.which("cascadec", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "cascadec"]


def _wall(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def startup(runs: int) -> None:
    bare_argv = [sys.executable, "-c", "pass"]
    plan_argv = [*_command(), "plan", "specs/ministral3.yaml"]
    _wall(bare_argv), _wall(plan_argv)  # warm the page cache and __pycache__
    bare, plan = [], []
    for _ in range(runs):
        bare.append(_wall(bare_argv))
        plan.append(_wall(plan_argv))
    b, p = statistics.median(bare), statistics.median(plan)
    print(f"start-up: {runs} interleaved runs each, medians (cpus: {os.cpu_count()})")
    print(f"  {'command':<44} {'median':>8} {'min':>8} {'max':>8}")
    print(f"  {'python -c pass':<44} {b:8.3f} {min(bare):8.3f} {max(bare):8.3f}")
    print(f"  {'cascadec plan specs/ministral3.yaml':<44} {p:8.3f} {min(plan):8.3f} {max(plan):8.3f}")
    verdict = "meets" if p - b < TARGET_S else "MISSES"
    print(f"  plan cost (plan - bare): {p - b:.3f} s; ratio plan / bare: {p / b:.1f}x; "
          f"{verdict} the {TARGET_S} s target")


def chained_spec(children: int) -> str:
    """A family of ``children`` children, each cut from the previous one's short-context phase."""
    ffn0 = 256 * (children + 2)
    out = [
        "cascadec: 1", f"family: chain-{children}",
        "budget: {tokens: 1T}",
        "defaults:",
        "  calibration: {data: web, samples: 64, seq_len: 1024}",
        "  batch: {global: 64}",
        "  optimizer: {lr: 3.0e-4}",
        "models:",
        "  parent:",
        "    source: {hub: org/parent}",
        f"    arch: {{family: mistral, layers: 32, hidden: 1024, ffn: {ffn0}, heads: 16, kv_heads: 4, "
        "head_dim: 64, vocab: 32000}",
        "data:",
        "  web: {kind: jsonl, paths: [\"data/web/*.jsonl\"], field: text, stream: true}",
        "  long: {kind: jsonl, paths: [\"data/long/*.jsonl\"], field: text}",
        "  chat: {kind: jsonl, paths: [\"data/chat/*.jsonl\"], field: messages}",
        "children:",
    ]
    for i in range(children):
        out += [
            f"  - name: c{i:04d}",
            f"    prune_from: {'parent' if i == 0 else f'c{i - 1:04d}/short'}",
            f"    shape: {{ffn: {ffn0 - 256 * (i + 1)}}}",
            "    phases:",
            f"      - {{name: short, teacher: parent, data: web, tokens: {100 / (children + 1):.4f}%, seq_len: 1024}}",
            "      - name: long",
            "        teacher: parent",
            "        data: long",
            "        tokens: 1B",
            "        seq_len: 8192",
            "        rope: {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 1024}",
            "    variants:",
            "      instruct:",
            "        - {name: sft, kind: sft, from: long, teacher: parent, data: chat, tokens: 100M, seq_len: 4096}",
        ]
    out.append("eval: {data: long, tokens: 1M, seq_len: 1024}")
    return "\n".join(out) + "\n"


def scaling(sizes: list[int], repeats: int) -> None:
    sys.path.insert(0, str(REPO))
    import gc

    from cascadec.cli import GC_THRESHOLDS
    from cascadec.compile import compile_file

    gc.set_threshold(*GC_THRESHOLDS)  # as `cascadec` itself runs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"chain-{n}.yaml"
            path.write_text(chained_spec(n))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                result = compile_file(str(path))
                times.append(time.perf_counter() - t)
            rows.append((n, len(result.plan["stages"]), min(times)))
    xs, ys = [r[0] for r in rows], [r[2] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    icpt = my - slope * mx
    print(f"\nscaling: in-process compile_file, best of {repeats}")
    print(f"  {'children':>8} {'stages':>7} {'compile s':>10} {'ms/child':>9} {'linear fit s':>13}")
    for n, stages, t in rows:
        print(f"  {n:8d} {stages:7d} {t:10.3f} {1000 * t / n:9.2f} {icpt + slope * n:13.3f}")
    growth = ys[-1] / ys[0]
    print(f"  fit: {1000 * icpt:.1f} ms + {1000 * slope:.2f} ms/child; {xs[-1] // xs[0]}x the children took "
          f"{growth:.1f}x the time (linear: {xs[-1] / xs[0]:.0f}x, quadratic: {(xs[-1] / xs[0]) ** 2:.0f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="interleaved start-up runs of each command")
    ap.add_argument("--repeats", type=int, default=3, help="compiles per family size (best is kept)")
    ap.add_argument("--sizes", default="50,100,200,400", help="children per generated family")
    args = ap.parse_args()
    startup(args.runs)
    scaling([int(s) for s in args.sizes.split(",")], args.repeats)


if __name__ == "__main__":
    main()
