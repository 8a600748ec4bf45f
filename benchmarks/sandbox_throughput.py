"""How many sandboxed test runs a machine does per minute (the code reward's cost in GRPO).

    python benchmarks/sandbox_throughput.py [--runs 60] [--workers 2] [--timeout 1.0]

A mix of snippets in a fixed order, each one sandboxed test run (`run_tests` with one test):
passing solutions, failing ones (a wrong answer, an exception, a syntax error) and ones that run
into the limit (an infinite loop: killed at ``--timeout``). ``--workers`` runs go at once (threads,
each waiting on its sandbox process; 2 = the CI machine's cores). The same mix runs with the
namespaces on (`unshare`, when this machine allows them) and off (audit hook), interleaved in one
run so both see the same load; prints runs per minute for each mix part and overall, and the ratio.
A bare `python -c pass` start, timed the same way, gives the floor no sandbox can beat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascadec.runtime.rollout import sandbox  # noqa: E402

SOLUTION = "def solve(xs):\n    return sorted(xs)\n"
MIX = [  # (kind, code, test)
    ("pass", SOLUTION, "assert solve([3, 1, 2]) == [1, 2, 3]"),
    ("pass", "def solve(s):\n    return s[::-1]\n", "assert solve('abc') == 'cba'"),
    ("pass", "def solve(n):\n    return sum(range(n + 1))\n", "assert solve(100) == 5050"),
    ("fail", "def solve(xs):\n    return xs\n", "assert solve([3, 1, 2]) == [1, 2, 3]"),
    ("fail", "def solve(xs):\n    return xs[10]\n", "solve([1])"),
    ("fail", "def solve(xs:\n", "solve([1])"),
    ("timeout", "def solve(xs):\n    while True:\n        pass\n", "solve([1])"),
]


def _batch(runs: int, workers: int, timeout: float, namespaces: bool) -> tuple[float, dict[str, list[float]]]:
    jobs = [MIX[i % len(MIX)] for i in range(runs)]

    def one(job):
        kind, code, test = job
        t = time.perf_counter()
        result = sandbox.run_tests(code, [test], timeout_s=timeout, namespaces=namespaces)[0]
        expected = {"pass": "passed", "timeout": "timeout"}.get(kind)
        assert (result.reason == expected) if expected else not result.passed, (kind, result)
        return kind, time.perf_counter() - t

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(one, jobs))
    wall = time.perf_counter() - t
    per_kind: dict[str, list[float]] = {}
    for kind, seconds in done:
        per_kind.setdefault(kind, []).append(seconds)
    return wall, per_kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=70, help="sandboxed test runs per setting")
    ap.add_argument("--workers", type=int, default=2, help="runs at once")
    ap.add_argument("--timeout", type=float, default=1.0, help="timeout_s of each run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each setting")
    args = ap.parse_args()
    settings = [("namespaces", True), ("audit hook only", False)]
    try:
        sandbox.isolation(True)
    except RuntimeError:
        settings = settings[1:]
    print(f"sandbox throughput: {args.runs} runs x {args.rounds} rounds per setting, {args.workers} at once, "
          f"timeout_s {args.timeout:g}, cpus {os.cpu_count()}, uid {os.geteuid()}")
    print(f"  mix: {len(MIX)} snippets in turn: " + ", ".join(f"{sum(k == kind for k, _, _ in MIX)} {kind}"
                                                                  for kind in ("pass", "fail", "timeout")))
    for name, ns in settings:
        print(f"  {name}: {sandbox.isolation(ns)}")
    bare = []
    for _ in range(10):
        t = time.perf_counter()
        subprocess.run([sandbox.isolation(None).python, "-s", "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)
    walls: dict[str, list[float]] = {name: [] for name, _ in settings}
    kinds: dict[str, dict[str, list[float]]] = {name: {} for name, _ in settings}
    for _ in range(args.rounds):
        for name, ns in settings:
            wall, per_kind = _batch(args.runs, args.workers, args.timeout, ns)
            walls[name].append(wall)
            for k, v in per_kind.items():
                kinds[name].setdefault(k, []).extend(v)
    print(f"  bare interpreter start (python -s -c pass): median {statistics.median(bare) * 1000:.0f} ms")
    print(f"  {'setting':<18} {'runs/min':>9} {'pass ms':>8} {'fail ms':>8} {'timeout ms':>10}")
    rate = {}
    for name, _ in settings:
        rate[name] = 60 * args.runs * args.rounds / sum(walls[name])
        med = {k: statistics.median(v) * 1000 for k, v in kinds[name].items()}
        print(f"  {name:<18} {rate[name]:9.0f} {med['pass']:8.0f} {med['fail']:8.0f} {med['timeout']:10.0f}")
    if len(rate) == 2:
        a, b = rate.values()
        print(f"  namespaces / audit hook only: {a / b:.2f}x")


if __name__ == "__main__":
    main()
