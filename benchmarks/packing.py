"""Packing benchmark (not a test): how full best-fit decreasing fills sft rows against next-fit in
stream order (the simplest greedy packer), and how long packing takes per million conversations.

    .venv/bin/python benchmarks/packing.py [--examples 200000] [--seq-len 16384] [--mean 1024]

Conversation lengths are log-normal (sigma 1.0, a long right tail as in real chat data) with the
given mean, cut at ``seq_len`` (the sft stage truncates longer ones). Fill = conversation tokens /
row tokens: the share of the sft compute that trains on data rather than padding.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cascadec.runtime.data.packing import best_fit_decreasing


def next_fit(lengths: np.ndarray, capacity: int) -> int:
    """Rows used when each conversation goes into the current row or, if it does not fit, a new one."""
    rows, room = 0, 0
    for n in lengths.tolist():
        if n > room:
            rows, room = rows + 1, capacity
        room -= n
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=200_000)
    ap.add_argument("--seq-len", type=int, default=16_384)
    ap.add_argument("--mean", type=float, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sigma = 1.0
    rng = np.random.default_rng(args.seed)
    lengths = rng.lognormal(np.log(args.mean) - sigma ** 2 / 2, sigma, args.examples).astype(np.int64)
    lengths = np.clip(lengths, 8, args.seq_len)
    tokens = int(lengths.sum())

    started = time.perf_counter()
    offsets, _ = best_fit_decreasing(lengths, args.seq_len)
    bfd_s = time.perf_counter() - started
    bfd_rows = len(offsets) - 1
    nf_rows = next_fit(lengths, args.seq_len)
    print(f"{args.examples:,} conversations, mean {tokens / args.examples:,.0f} tokens, rows of {args.seq_len:,}")
    print(f"best-fit decreasing: {bfd_rows:,} rows, fill {tokens / (bfd_rows * args.seq_len):.2%}, "
          f"{bfd_s:.2f} s ({bfd_s / args.examples * 1e6:.1f} s per million conversations)")
    print(f"next-fit in order:   {nf_rows:,} rows, fill {tokens / (nf_rows * args.seq_len):.2%}")
    print(f"rows (= sft compute) next-fit / best-fit: {nf_rows / bfd_rows:.3f}")


if __name__ == "__main__":
    main()
