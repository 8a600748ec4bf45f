"""Rewards for the grpo tests, named in a plan as `grporewards:<function>` (contract of a
`reward_function`: f(prompts, completions, **columns) -> list[float | None])."""

from __future__ import annotations


def exact(prompts, completions, answer, **columns):
    """1 when the completion, stripped, starts with the record's ``answer``; None without one."""
    return [None if a is None else float(c.strip().startswith(a)) for c, a in zip(completions, answer)]
