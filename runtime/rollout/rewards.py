"""GRPO rewards: what a completion earns, per reward function, computed in worker processes.

Contract of every reward (TRL's): ``f(prompts, completions, **columns) -> list[float | None]``, one
value per completion, None = not applicable (a math checker on a code prompt). ``columns`` are the
records' fields as lists aligned with the completions (``answer``, ``tests``, ``rubric`` and every
other field) plus, when the completions are generate.Completion objects, ``completion_ids``,
``completion_finish`` ("eos" | "stop" | "length" | "loop") and ``completion_looped``.

The built-in rewards return values in natural units, and the spec's weight scales them; the
default weights give Magistral's shaping (§2.2): format 0.1 when it holds, a correct math answer
or all code tests passed 0.9, the length penalty down to −0.1:

====================  ==========================================  ==============  ========
kind                  value                                       not applicable  weight
====================  ==========================================  ==============  ========
``format`` (a gate)   1 when the format holds, else 0             never           0.1
``math_answer``       1 when the final answer equals ``answer``   no ``answer``   0.9
``code_tests``        1 when every test passes (or the fraction)  no ``tests``    0.9
``length``            0 … −1 (Magistral eq. 1 ÷ 0.1)              never           0.1
``rubric_model``      the fraction of rubric items met (rubric.py)  no ``rubric``    1
``reward_function``   what ``module:function`` returns            its None        1
====================  ==========================================  ==============  ========

A gate is graded first, in the calling process: where it gives 0 no other reward is computed
(they are None), so a broken format scores exactly 0 and costs no sandbox run (Magistral's "0 and
grading stops"). Rewards are objects, not closures, so that they pickle into worker processes;
a reward that holds a model (``in_process``: the rubric judge) runs in the calling process
instead, while the workers compute the others.
"""

from __future__ import annotations

import importlib
import math
import re
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from cascadec import rewarding

from . import mathcheck
from .sandbox import run_tests

Reward = Callable[..., list[float | None]]
THINK, END_THINK = "<think>", "</think>"
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*\n(.*?)```", re.DOTALL)


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it."""


def answer_part(text: str) -> str:
    """What follows the reasoning: the text after the last ``</think>``, or all of it."""
    at = text.rfind(END_THINK)
    return text if at < 0 else text[at + len(END_THINK):]


def _column(columns: dict, key: str, n: int) -> list:
    value = columns.get(key)
    return [None] * n if value is None else list(value)


@dataclass(frozen=True)
class FormatGate:
    """Magistral's format check (§2.2.1). With ``think``: the completion starts with ``<think>``,
    holds exactly one ``<think>`` and one ``</think>`` after it, and an answer follows; without:
    no think tags at all. The answer must then hold a ``\\boxed{}`` for a record with an
    ``answer``, a fenced code block with a language tag for one with ``tests``, and be non-empty
    otherwise."""

    think: bool = True
    gate = True  # a 0 stops grading

    def __call__(self, prompts, completions, **columns) -> list[float]:
        n = len(completions)
        return [float(self.holds(c, a, t)) for c, a, t in
                zip(completions, _column(columns, "answer", n), _column(columns, "tests", n))]

    def holds(self, text: str, answer, tests) -> bool:
        if self.think:
            body = text.lstrip()
            if not body.startswith(THINK) or text.count(THINK) != 1 or text.count(END_THINK) != 1:
                return False
            rest = answer_part(text)
        else:
            if THINK in text or END_THINK in text:
                return False
            rest = text
        if tests:
            return any(lang for lang, _ in FENCE.findall(rest))
        if answer is not None:
            return mathcheck.boxed(rest) is not None
        return bool(rest.strip())


@dataclass(frozen=True)
class MathAnswer:
    """1 when the final answer (last ``\\boxed{}``, else the last number) after the reasoning equals
    the record's ``answer`` numerically or symbolically (mathcheck.py), else 0."""

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        out = []
        for text, ref in zip(completions, _column(columns, "answer", len(completions))):
            if ref is None:
                out.append(None)
                continue
            got = mathcheck.final_answer(answer_part(text))
            out.append(float(got is not None and mathcheck.equivalent(got, str(ref))))
        return out


def first_code_block(text: str) -> str | None:
    """The first fenced code block (Magistral grades the first one), or None."""
    m = FENCE.search(text)
    return m.group(2) if m else None


@dataclass(frozen=True)
class CodeTests:
    """The first code block after the reasoning, run against the record's ``tests`` in the
    sandbox: 1 when all pass, else 0 (Magistral §7.4.1 kept this binary reward); with
    ``fraction``, the share of tests passed. Identical code for the same tests within one call (a
    group's samples often agree) runs once: the tests are deterministic programs, so a second run
    could differ only by a timeout on a loaded machine."""

    timeout_s: float = 4.0
    memory_mb: int = 300
    fraction: bool = False

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        out, done = [], {}  # (code, tests) -> score: a group's identical answers run in the sandbox once
        for text, tests in zip(completions, _column(columns, "tests", len(completions))):
            if not tests:
                out.append(None)
                continue
            code = first_code_block(answer_part(text))
            if code is None:
                out.append(0.0)
                continue
            key = (code, tuple(tests))
            if key not in done:
                results = run_tests(code, list(tests), timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                                    stop_on_failure=not self.fraction)
                passed = sum(r.passed for r in results)
                done[key] = passed / len(results) if self.fraction else float(passed == len(results))
            out.append(done[key])
        return out


@dataclass(frozen=True)
class LengthPenalty:
    """Magistral's soft length penalty (eq. 1, after DAPO) divided by its 0.1 scale: with
    L = completion tokens, l_max = ``max_tokens`` and l_cache = ``cache_tokens``, 0 while
    L ≤ l_max − l_cache, −(L − l_max + l_cache)/l_cache up to l_max, −1 beyond."""

    max_tokens: int
    cache_tokens: int

    def __call__(self, prompts, completions, **columns) -> list[float]:
        ids = columns.get("completion_ids")
        if ids is None:
            raise ValueError("the length reward counts tokens: pass `completion_ids` (or Completion objects)")
        return [self.value(len(x)) for x in ids]

    def value(self, length: int) -> float:
        free = self.max_tokens - self.cache_tokens
        if length <= free:
            return 0.0
        if length <= self.max_tokens:
            return -(length - free) / self.cache_tokens
        return -1.0


@dataclass(frozen=True)
class CallableReward:
    """A user's ``module:function`` with the reward contract, imported where it runs."""

    function: str

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)(prompts=prompts, completions=completions, **columns)


def build_reward(name: str, config: dict, model_dir: Path | None = None, *, device=None) -> Reward:
    """The reward of the plan's ``config.judges[name]`` (its ``kind`` and options; an option the
    plan lacks takes the default of cascadec/rewarding.py). ``model_dir``: the judge checkpoint of
    a rubric_model (the stage's `judge:<name>` input), loaded onto ``device``."""
    kind = config["kind"]
    if kind not in rewarding.OPTIONS:
        raise ValueError(f"judge '{name}' of kind {kind} cannot give a GRPO reward: the kinds that can are "
                         f"{', '.join(rewarding.REWARD_KINDS)}")
    c, _ = rewarding.resolve(kind, {k: v for k, v in config.items() if k != "kind"}, None)
    if kind == "rubric_model":  # imported here: the workers that unpickle the other rewards need no torch
        from . import rubric

        return rubric.build(name, c, model_dir, device=device)
    if kind == "format":
        return FormatGate(think=c["think"])
    if kind == "math_answer":
        return MathAnswer()
    if kind == "code_tests":
        return CodeTests(timeout_s=c["timeout_s"], memory_mb=c["memory_mb"], fraction=c["fraction"])
    if kind == "length":
        if "max_tokens" not in c:
            raise ValueError(f"judge '{name}': a length reward needs `max_tokens` (the plan sets it from the stage)")
        return LengthPenalty(max_tokens=c["max_tokens"], cache_tokens=c["cache_tokens"])
    return CallableReward(c["function"])


def build_rewards(judges: dict[str, dict], inputs: dict | None = None, *, device=None) -> dict[str, tuple[Reward, float]]:
    """Every reward of a stage's ``config.judges``, with its weight (the plan's, else the kind's
    default); ``inputs``: the stage's inputs, where a judge's model is `judge:<name>`."""
    inputs = inputs or {}
    return {name: (build_reward(name, c, inputs.get(f"judge:{name}"), device=device),
                   float(c.get("weight", rewarding.OPTIONS[c["kind"]]["weight"])))
            for name, c in judges.items()}


def describe(reward: Reward) -> str:
    return getattr(reward, "function", None) or type(reward).__name__


def _apply(name: str, reward: Reward, index: list[int], prompts: list, completions: list[str],
           columns: dict[str, list]) -> list[float | None]:
    """Run one reward on the items ``index`` (the inputs are those items already); checks what it
    returns. Runs in a worker process."""
    try:
        values = reward(prompts, completions, **columns)
    except Exception as e:  # noqa: BLE001 -- re-raised, located, in the trainer
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise RewardError(f"reward '{name}' ({describe(reward)}) raised {type(e).__name__}: {e} "
                          f"at {frame.filename}:{frame.lineno}, scoring completions {index[0]}..{index[-1]}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(index):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise RewardError(f"reward '{name}' ({describe(reward)}) returned {got} for {len(index)} completions; "
                          f"it must return one float or None per completion")
    for i, v in zip(index, values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise RewardError(f"reward '{name}' ({describe(reward)}) returned {v!r} for completion {i}; "
                              f"a reward is a finite float, or None when it does not apply")
    return [None if v is None else float(v) for v in values]


def score(rewards: dict[str, tuple[Reward, float]], prompts: Sequence, completions: Sequence,
          columns: dict[str, Sequence], *, workers: int, pool: Executor | None = None) -> dict[str, list[float | None]]:
    """Each reward's value per completion, in input order: ``{name: [value or None, ...]}``.

    ``completions``: strings, or generate.Completion objects, whose ids, finish reasons and loop
    flags become the ``completion_ids``, ``completion_finish`` and ``completion_looped`` columns.
    Gates run first, here; the other rewards run in ``workers`` processes (0 = in this process),
    the per-item built-ins split into one chunk per worker, a callable in one call with all its
    items, while the ``in_process`` ones (a judge model) run here. ``pool``: an executor to reuse
    across steps.
    """
    n = len(completions)
    texts = [c if isinstance(c, str) else c.text for c in completions]
    columns = {k: list(v) for k, v in columns.items()}
    if n and not isinstance(completions[0], str) and "completion_ids" not in columns:
        columns["completion_ids"] = [list(c.ids) for c in completions]
        if hasattr(completions[0], "finish"):
            columns["completion_finish"] = [c.finish for c in completions]
            columns["completion_looped"] = [bool(c.looped) for c in completions]
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"column '{k}' has {len(v)} values for {n} completions")
    prompts = list(prompts)
    out: dict[str, list[float | None]] = {}
    live = list(range(n))
    for name, (reward, _) in rewards.items():
        if getattr(reward, "gate", False):
            out[name] = _apply(name, reward, list(range(n)), prompts, texts, columns) if n else []
            live = [i for i in live if out[name][i]]
    jobs, here = [], []  # (name, reward, items): for the workers; run in this process
    for name, (reward, _) in rewards.items():
        if name in out:
            continue
        out[name] = [None] * n
        if not live:
            continue
        if getattr(reward, "in_process", False):
            here.append((name, reward, live))
            continue
        chunks = [live] if isinstance(reward, CallableReward) or workers <= 1 else \
            [live[k::workers] for k in range(min(workers, len(live)))]
        jobs += [(name, reward, chunk) for chunk in chunks]
    def args(name, reward, chunk):
        pick = lambda xs: [xs[i] for i in chunk]  # noqa: E731
        return name, reward, chunk, pick(prompts), pick(texts), {k: pick(v) for k, v in columns.items()}

    if workers <= 0 or not jobs:
        results = [_apply(*args(*job)) for job in [*jobs, *here]]
    else:
        own = pool is None
        pool = pool or ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        try:
            futures = [pool.submit(_apply, *args(*job)) for job in jobs]
            mine = [_apply(*args(*job)) for job in here]  # while the workers run
            results = [f.result() for f in futures] + mine
        finally:
            if own:
                pool.shutdown(cancel_futures=True)
    for (name, _, chunk), values in zip([*jobs, *here], results):
        for i, v in zip(chunk, values):
            out[name][i] = v
    return out


def total(scores: dict[str, list[float | None]], weights: dict[str, float]) -> list[float | None]:
    """Σ weight · value over the rewards that apply, per completion; None when none applies (TRL's
    rule: such a completion gets no advantage)."""
    n = len(next(iter(scores.values()), []))
    out = []
    for i in range(n):
        parts = [weights[k] * v[i] for k, v in scores.items() if v[i] is not None]
        out.append(sum(parts) if parts else None)
    return out
