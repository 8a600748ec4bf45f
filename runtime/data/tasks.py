"""The built-in post-training tasks (`builtin: tasks`): small problems with checkable answers that a
~1M-parameter code model can learn, generated deterministically, with a held-out split.

Four tasks (docs/data.md shows a record of each):

- ``expr``: evaluate a small Python expression (2 or 3 one-digit operands, ``+ - *``);
  the worked steps apply ``*`` first, then ``+``/``-`` left to right.
- ``sort``: sort a list of 3 to 5 one-digit numbers ascending.
- ``reverse``: reverse a word of 3 to 6 lowercase letters; the steps spell it out.
- ``function``: write a one-line ``f(x)`` from a description in words; graded by hidden tests
  (three ``assert f(x) == y``) run in the sandbox.

Answers follow the reward functions' conventions (`runtime/rollout/rewards.py`), so GRPO grades
these records with the stock rewards: the final answer of expr, sort and reverse is ``\\boxed{…}``
(the math checker reads the last box and compares normalised strings, so ``[1, 2]`` and ``[1,2]``
agree), the function is a fenced ```` ```python ```` block. A response is the worked steps, then the
answer; with ``think: true`` the steps are inside ``<think>…</think>`` (the reasoning flavour).

A fallible teacher (``unfinished: x``, chat and text records): a share x of the responses stop
after the worked steps, before the final answer, as truncated traces in distilled data do; which
ones is a hash of the problem, so the same on every machine. An SFT on such data learns to stop
short part of the time; a later verifiable reward (grpo: the format gate and the answer) or a
judge that checks answers (odpo) has that to undo. Prompts and preference records are never
affected (their answers grade).

Determinism and the split: every problem has a key (its expression, list, word or formula); it is
held out when ``sha256("task:key")[0] % HELDOUT_EVERY == 0``. Each split draws from its own
``random.Random`` seeded by ``sha256("cascadec-tasks:task:split")`` and keeps the first
``COUNTS[split]`` distinct problems of its own side of the key hash: the same records on every
machine and Python, and train and heldout disjoint by construction (the tests assert both).

The unit of a tasks source is this file: its sha256 is what a stage's manifest records, so editing
a generator reruns the stages that read the data it makes, like editing a data file.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cascadec.spec import BUILTIN_TASKS as TASKS  # the compiler checks names against the same list

SPLITS = ("train", "heldout")
COUNTS = {"train": 1000, "heldout": 100}  # problems per task and split
HELDOUT_EVERY = 10  # ~10 % of each task's problem space is held out
FORMATS = ("text", "chat", "prompts", "preference")
FILE = Path(__file__)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# function templates: (formula, description); a in 2..20, b in 1..20 -> 6 × 19 × 20 = 2,280 problems
FUNCTIONS = (
    ("x * {a} + {b}", "x times {a} plus {b}"),
    ("x * {a} - {b}", "x times {a} minus {b}"),
    ("(x + {a}) * {b}", "x plus {a}, times {b}"),
    ("x % {a} + {b}", "x modulo {a}, plus {b}"),
    ("x // {a} + {b}", "x floor-divided by {a}, plus {b}"),
    ("x * x * {a} + {b}", "x squared times {a} plus {b}"),
)
TEST_INPUTS = (1, 4, 9)


@dataclass(frozen=True)
class Problem:
    """One problem: what the user asks, the worked steps, and how it is graded."""

    task: str
    key: str  # identity of the problem (the split is a hash of it)
    prompt: str  # the user's message
    steps: tuple[str, ...]  # short worked steps
    final: str  # the final answer as the model writes it: \boxed{…} or a ```python block
    wrong: str  # a plausible wrong final answer (the rejected side of a preference pair)
    answer: str | None = None  # exact answer (expr, sort, reverse)
    tests: tuple[str, ...] | None = None  # hidden tests (function)
    solution: str | None = None  # the reference function (function)

    def response(self, think: bool = False, final: str | None = None) -> str:
        """The assistant's message: steps then the answer; the steps in <think> tags when ``think``."""
        steps = "\n".join(self.steps)
        end = self.final if final is None else final
        return f"<think>{steps}</think>{end}" if think else f"{steps}\n{end}"


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256(":".join(parts).encode()).digest()[:8], "big")


def split_of(task: str, key: str) -> str:
    """Which split a problem belongs to: a hash of its task and key."""
    return "heldout" if hashlib.sha256(f"{task}:{key}".encode()).digest()[0] % HELDOUT_EVERY == 0 else "train"


def boxed(value: str) -> str:
    return "\\boxed{" + value + "}"


# ---------------------------------------------------------------------------------------------
# Generators: one problem from a Random


def _expr(rng: random.Random) -> Problem:
    n = rng.choice((2, 3))
    terms: list = [rng.randint(1, 9)]
    for _ in range(n - 1):
        terms += [rng.choice("+-*"), rng.randint(1, 9)]
    text = "".join(map(str, terms))
    steps, work = [], list(terms)
    for ops in ("*", "+-"):  # precedence: products first, then sums left to right
        while any(t in ops for t in work[1::2]):
            i = next(i for i in range(1, len(work), 2) if work[i] in ops)
            a, op, b = work[i - 1:i + 2]
            value = a * b if op == "*" else a + b if op == "+" else a - b
            steps.append(f"{a}{op}{b}={value}")
            work[i - 1:i + 2] = [value]
    answer = str(work[0])
    if answer != str(eval(text)):  # noqa: S307 — our own digits and operators; guards the steps above
        raise AssertionError(f"expr steps of {text} give {answer}")
    left = terms[0]  # the classic mistake: left to right, ignoring precedence
    for i in range(1, len(terms), 2):
        op, b = terms[i], terms[i + 1]
        left = left * b if op == "*" else left + b if op == "+" else left - b
    wrong = str(left) if str(left) != answer else str(int(answer) + 1)
    return Problem("expr", text, f"Compute: {text}", tuple(steps), boxed(answer), boxed(wrong), answer=answer)


def _sort(rng: random.Random) -> Problem:
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    done = sorted(items)
    answer = str(done)
    wrong = str(items if items != done else done[::-1])
    if wrong == answer:  # all equal: any other list is wrong
        wrong = str(done + [done[-1]])
    return Problem("sort", str(items), f"Sort: {items}", (" <= ".join(map(str, done)),), boxed(answer), boxed(wrong),
                   answer=answer)


def _reverse(rng: random.Random) -> Problem:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    answer = word[::-1]
    wrong = word if word != answer else word + word[0]  # a palindrome's wrong answer: one letter more
    return Problem("reverse", word, f"Reverse: {word}", (" ".join(word), " ".join(answer)), boxed(answer),
                   boxed(wrong), answer=answer)


def _function(rng: random.Random) -> Problem:
    formula, words = rng.choice(FUNCTIONS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    body = formula.format(a=a, b=b)
    solution = f"def f(x): return {body}"
    ref = eval(f"lambda x: {body}")  # noqa: S307 — our own template and integers
    tests = tuple(f"assert f({x}) == {ref(x)}" for x in TEST_INPUTS)
    wrong_body = formula.format(a=a, b=b + 1)
    fence = "```python\n{}\n```"
    return Problem("function", body, f"Write a Python function f(x) that returns {words.format(a=a, b=b)}.",
                   (body,), fence.format(solution), fence.format(f"def f(x): return {wrong_body}"),
                   tests=tests, solution=solution)


GENERATORS = {"expr": _expr, "sort": _sort, "reverse": _reverse, "function": _function}


def problems(task: str, split: str, count: int | None = None) -> list[Problem]:
    """The first ``count`` (default ``COUNTS[split]``) distinct problems of ``task`` in ``split``."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"tasks split must be one of {', '.join(SPLITS)}, got {split!r}")
    count = COUNTS[split] if count is None else count
    rng, seen, out = random.Random(_seed("cascadec-tasks", task, split)), set(), []
    for _ in range(200 * count):
        p = GENERATORS[task](rng)
        if p.key in seen or split_of(task, p.key) != split:
            continue
        seen.add(p.key)
        out.append(p)
        if len(out) == count:
            return out
    raise ValueError(f"task {task}: only {len(out)} distinct {split} problems found for {count}")


def interleaved(tasks: tuple[str, ...], split: str) -> Iterator[Problem]:
    """The problems of ``tasks`` in turn (expr, sort, … , expr, sort, …), so any prefix is a mix."""
    lists = [problems(t, split) for t in tasks]
    for row in zip(*lists):
        yield from row


# ---------------------------------------------------------------------------------------------
# Records, as the readers hand them to chat.py (docs/data.md)


def unfinished(p: Problem, share: float) -> bool:
    """Whether a fallible teacher that leaves ``share`` of its answers unfinished stops short on ``p``."""
    return share > 0 and _seed("cascadec-tasks-unfinished", p.task, p.key) / 2 ** 64 < share


def record(p: Problem, fmt: str, think: bool = False, short: float = 0.0) -> dict:
    """``p`` as a record of format ``fmt`` (chat, prompts, preference; text is `document`);
    ``short``: the share of chat records that stop before the final answer (``unfinished``)."""
    if fmt == "chat":
        final = "" if unfinished(p, short) else None
        return {"messages": [{"role": "user", "content": p.prompt},
                             {"role": "assistant", "content": p.response(think, final)}], "task": p.task}
    if fmt == "preference":
        return {"prompt": p.prompt, "chosen": p.response(think), "rejected": p.response(think, p.wrong),
                "task": p.task}
    if fmt == "prompts":
        graded = {"answer": p.answer} if p.tests is None else {"tests": list(p.tests)}
        return {"prompt": p.prompt, **graded, "task": p.task}
    raise ValueError(f"tasks records come as chat, prompts or preference, not {fmt!r}")


def settings(source: dict) -> tuple[tuple[str, ...], str, bool, float]:
    """(tasks, split, think, unfinished) of a `builtin: tasks` source, validated."""
    tasks = tuple(source.get("tasks") or TASKS)
    if unknown := [t for t in tasks if t not in TASKS]:
        raise ValueError(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    split = source.get("split") or "train"
    if split not in SPLITS:
        raise ValueError(f"tasks split must be one of {', '.join(SPLITS)}, got {split!r}")
    short = float(source.get("unfinished") or 0.0)
    if not 0.0 <= short < 1.0:
        raise ValueError(f"tasks `unfinished` is a share in [0, 1), got {short}")
    return tasks, split, bool(source.get("think")), short


def records(source: dict) -> Iterator[tuple[str, dict]]:
    """(location, record) of every problem of ``source``, interleaved, in its ``format``."""
    tasks, split, think, short = settings(source)
    counters = dict.fromkeys(tasks, 0)
    for p in interleaved(tasks, split):
        where = f"builtin tasks/{split} {p.task} #{counters[p.task]}"
        counters[p.task] += 1
        yield where, record(p, source.get("format") or "chat", think, short)


def documents(source: dict) -> Iterator[str]:
    """Plain-text documents (``format: text``): the question, then the response."""
    tasks, split, think, short = settings(source)
    for p in interleaved(tasks, split):
        yield f"{p.prompt}\n{p.response(think, '' if unfinished(p, short) else None)}"
