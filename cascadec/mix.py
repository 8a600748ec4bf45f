"""Weighted data mixes: which source each packed sequence of a stage comes from. Pure; shared
by the compiler (per-source windows in the plan) and the runtime (reading), so both agree.

A mix with weights w_s (normalised to exact fractions n_s / P) interleaves whole sequences
(blocks of `seq_len` tokens) in a period of P sequences, n_s of them from source s, spread by
smooth weighted round robin (nginx's: each step every source gains n_s, the richest is chosen
and pays P), so 70/30 reads A A B A A B A B A B ... rather than seven A then three B. Sequence
i of a stage is the (i // P)·n_s + (earlier picks of s in the period)-th sequence of source s:
a stage of N sequences reads exactly `counts(N)[s]` sequences of each source, consecutively
from that source's own offset, so the single-pass rule holds per source.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

MAX_PERIOD = 10_000  # sequences; weights needing a longer period are refused (CSC270)


def fractions(mix: dict) -> dict[str, Fraction]:
    """Weights normalised to exact fractions, by source name (sorted). ``0.7`` is 7/10, not
    the nearest binary float, because the decimal the user wrote is what they meant."""
    raw = {name: Fraction(str(w)) for name, w in sorted(mix.items())}
    total = sum(raw.values())
    return {name: w / total for name, w in raw.items()}


def period(mix: dict) -> int:
    return math.lcm(*(f.denominator for f in fractions(mix).values()))


@lru_cache(maxsize=64)
def _pattern(items: tuple[tuple[str, int], ...], p: int) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    current = dict.fromkeys((name for name, _ in items), 0)
    order, before = [], []
    seen = dict.fromkeys(current, 0)
    for _ in range(p):
        for name, n in items:
            current[name] += n
        pick = max(current, key=lambda s: (current[s], -list(current).index(s)))  # ties: first name
        current[pick] -= p
        before.append(dict(seen))
        seen[pick] += 1
        order.append(pick)
    return tuple(order), tuple(before)


def schedule(mix: dict) -> tuple[int, dict[str, int], tuple[str, ...], tuple[dict, ...]]:
    """(period P, sequences per period by source, the source of each slot of the period, and for
    each slot the picks of every source before it)."""
    p = period(mix)
    if p > MAX_PERIOD:
        raise ValueError(f"mix weights need a period of {p:,} sequences (most {MAX_PERIOD:,})")
    per = {name: int(f * p) for name, f in fractions(mix).items()}
    order, before = _pattern(tuple(per.items()), p)
    return p, per, order, before


def counts(mix: dict, sequences: int) -> dict[str, int]:
    """How many of the first ``sequences`` sequences come from each source (they sum to it)."""
    p, per, order, before = schedule(mix)
    whole, rest = divmod(sequences, p)
    partial = before[rest]
    return {name: whole * n + partial.get(name, 0) for name, n in per.items()}


def locate(mix: dict, index: int) -> tuple[str, int]:
    """(source, its sequence number) of a stage's ``index``-th sequence."""
    p, per, order, before = schedule(mix)
    whole, rest = divmod(index, p)
    name = order[rest]
    return name, whole * per[name] + before[rest][name]
