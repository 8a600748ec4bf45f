"""The loop detector: is a sample stuck repeating itself?

A sample *loops* when the tail of its token ids is one n-gram repeated back to back: period
``p ≤ max_period`` tokens, at least ``min_repeats`` whole copies, covering at least ``min_span``
tokens. Ministral 3's online DPO makes such a sample lose its comparison outright, and the
generation engine ends it early (finish ``"loop"``) instead of paying for tokens up to
``max_new_tokens``.

Defaults, and why:

- ``max_period = 64``: degenerate loops repeat a phrase, a line or a short paragraph; 64
  tokens is a long sentence. A longer period that truly loops is caught a little later, when
  the generation hits ``max_new_tokens`` (finish ``"length"``, which loses anyway).
- ``min_repeats = 4``: three copies of a sentence or of a word ("very, very, very") are still
  prose or emphasis; a fourth verbatim copy in a row almost never is.
- ``min_span = 32``: short runs are legitimate text: ``"0, 0, 0, 0"`` in an array literal,
  ``"====="`` under a heading, ``"| --- | --- | --- |"`` in a table. Requiring 32 tokens means
  a one-token period needs 32 identical tokens, a period of 8 needs its 4 copies, and both
  must be what the sample ends with.

`Tracker` is the same rule applied incrementally, one token per step for a whole batch, at
O(max_period) work per row and step (the engine's per-step cost); `looping` is the plain
function on a finished list of ids. The two agree (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_PERIOD = 64
MIN_REPEATS = 4
MIN_SPAN = 32


def looping(ids: Sequence[int], *, min_repeats: int = MIN_REPEATS, max_period: int = MAX_PERIOD,
            min_span: int = MIN_SPAN) -> bool:
    """True when ``ids`` ends in one n-gram (period ≤ ``max_period``) repeated at least
    ``min_repeats`` times back to back, over at least ``min_span`` tokens."""
    ids = list(ids)
    n = len(ids)
    for p in range(1, min(max_period, n // max(min_repeats, 1)) + 1):
        run = 0  # positions t (from the end) with ids[t] == ids[t - p]
        while run < n - p and ids[n - 1 - run] == ids[n - 1 - run - p]:
            run += 1
        if _fires(run, p, min_repeats, min_span):
            return True
    return False


def _fires(run: int, period: int, min_repeats: int, min_span: int) -> bool:
    """A periodic tail of ``run + period`` tokens: enough copies and enough tokens?"""
    span = run + period
    return span >= min_span and span >= min_repeats * period


class Tracker:
    """`looping` for a batch of growing sequences, updated one token per row and step.

    Holds, per row and period p, the length of the current run of positions whose token
    equals the token p before it; a new token extends or resets each run. Works on torch
    tensors so the engine's rows are updated together; rows can be dropped (``keep``) as
    the engine compacts its batch.
    """

    def __init__(self, rows: int, *, device=None, min_repeats: int = MIN_REPEATS,
                 max_period: int = MAX_PERIOD, min_span: int = MIN_SPAN):
        import torch

        self.min_repeats, self.max_period, self.min_span = min_repeats, max_period, min_span
        self.periods = torch.arange(1, max_period + 1, device=device)
        self.runs = torch.zeros(rows, max_period, dtype=torch.long, device=device)
        self.history = torch.zeros(rows, max_period, dtype=torch.long, device=device)  # last tokens, newest first
        self.length = 0

    def push(self, tokens):
        """Add one token per row (a [rows] tensor); returns a [rows] bool tensor: looping now."""
        import torch

        same = tokens[:, None] == self.history  # history[:, p-1] is the token p steps back
        valid = self.periods <= self.length
        self.runs = torch.where(same & valid, self.runs + 1, torch.zeros_like(self.runs))
        self.history = torch.cat([tokens[:, None], self.history[:, :-1]], dim=1)
        self.length += 1
        span = self.runs + self.periods
        fires = (span >= self.min_span) & (span >= self.min_repeats * self.periods)
        return fires.any(dim=1)

    def keep(self, index) -> None:
        """Keep only the rows at ``index`` (a long tensor), in that order."""
        self.runs, self.history = self.runs[index], self.history[index]
