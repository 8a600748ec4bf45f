"""GRPO reward settings: which judge kinds score one answer, their options and defaults.

Shared by `graph` (the plan carries every resolved value), `checks` (CSC330–CSC333, CSC335) and
`cascadec.runtime.rollout.rewards` (which builds the rewards from the plan), so the defaults
live in one place. Pure, torch-free. What each reward computes is in docs/rewards.md.
"""

from __future__ import annotations

from . import judging

# kind -> (its own options with their defaults; None = resolved per stage). `weight` is every
# reward's; the defaults give Magistral's shaping (§2.2): format 0.1, a correct answer 0.9, the
# length penalty down to -0.1 (each built-in reward returns natural units: 1/0, 0..-1).
OPTIONS: dict[str, dict] = {
    "format": {"weight": 0.1, "think": True},
    "math_answer": {"weight": 0.9},
    "code_tests": {"weight": 0.9, "timeout_s": 4.0, "memory_mb": 300, "fraction": False},
    "length": {"weight": 0.1, "max_tokens": None, "cache_tokens": None},
    # the LM rubric judge: `hard` = the fraction of items met (P(yes) > 0.5), the issue's "fraction
    # of rubric items met"; `soft` = the mean P(yes). The template is resolved into the plan, so an
    # edit of the default shows in the plan's diff and reruns the stage.
    "rubric_model": {"weight": 1.0, "mode": "hard", "template": judging.RUBRIC_TEMPLATE,
                     "answers": list(judging.RUBRIC_ANSWERS), "temperature": 1.0, "batch_size": 16},
    "reward_function": {"weight": 1.0, "function": None},
}
REWARD_KINDS = tuple(OPTIONS)
RUBRIC_MODES = ("hard", "soft")
CACHE_SHARE = 5  # l_cache = l_max / 5 unless given (DAPO's 4,096 of 20,480)


def resolve(kind: str, options: dict, max_new_tokens: int | None) -> tuple[dict, list[str]]:
    """A reward's full config (kind, every option of its kind) and the options that took a default.

    The length penalty's ``max_tokens`` defaults to the stage's ``generation.max_new_tokens`` (the
    longest completion; None: left unset), its ``cache_tokens`` to a fifth of ``max_tokens``."""
    out, defaulted = {"kind": kind, **options}, []
    for key, default in OPTIONS[kind].items():
        if key in options:
            continue
        if key == "max_tokens":
            default = max_new_tokens
        elif key == "cache_tokens" and "max_tokens" in out:
            default = max(1, out["max_tokens"] // CACHE_SHARE)
        if default is not None:
            out[key] = list(default) if isinstance(default, list) else default
            defaulted.append(key)
    return out, defaulted
