"""GRPO rewards: exact values of each built-in reward, the gate, callables, and `score` in workers."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from cascadec.runtime.rollout import mathcheck
from cascadec.runtime.rollout.rewards import (CallableReward, CodeTests, FormatGate, LengthPenalty, MathAnswer,
                                              RewardError, build_rewards, score, total)

# ---------------------------------------------------------------------------------------------
# Callables for the tests (importable by name from worker processes: this module is on sys.path)


def only_tagged(prompts, completions, *, tag, **_):
    """1 per 'yes' in the completion, None where the record's tag is not 'x' (not applicable)."""
    return [float(c.count("yes")) if t == "x" else None for c, t in zip(completions, tag)]


def crashes(prompts, completions, **_):
    return [1.0 / (len(c) - len(c)) for c in completions]


def too_few(prompts, completions, **_):
    return [0.0]


def not_finite(prompts, completions, **_):
    return [math.nan for _ in completions]


def seen_by_workers(prompts, completions, *, answer, **_):
    """Records what it was asked to grade (the format gate must keep broken samples away)."""
    with open(os.environ["CASCADEC_TEST_SEEN"], "a") as f:
        f.writelines(c.replace("\n", " ") + "\n" for c in completions)
    return [0.5 for _ in completions]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("completion", "reference", "reward"), [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "1/2", 1.0),
    ("\\boxed{2/4}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{6}{8}}", "0.75", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\frac{-3}{4}}", "-3/4", 1.0),
    ("We get x = −3.", "-3", 1.0),  # the last number; a Unicode minus
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{ 12 }.", "12", 1.0),
    ("\\boxed{$7$}", "7.0", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),  # symbolic
    ("\\boxed{x + 1}", "1+x", 1.0),
    ("\\boxed{0.333}", "1/3", 0.0),  # exact rationals: a rounded decimal is not a third
    ("\\boxed{3}, although one might say 4", "4", 0.0),  # the boxed answer wins over the last number
    ("\\boxed{5} then \\boxed{6}", "6", 1.0),  # the last box
    ("<think>it is \\boxed{5}</think>The answer is \\boxed{6}", "5", 0.0),  # never from the reasoning
    ("<think>it is 5</think>The answer is \\boxed{6}", "6", 1.0),
    ("I do not know", "4", 0.0),
    ("\\boxed{-2}", "2", 0.0),
    ("\\boxed{\\frac{1}{0}}", "0", 0.0),
    ("\\boxed{9^9^9^9}", "1", 0.0),  # never computed
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{__import__('os').system('touch /tmp/cascadec-pwned')}", "0", 0.0),  # never evaluated
])
def test_math_answer(completion, reference, reward):
    assert MathAnswer()([[]], [completion], answer=[reference]) == [reward]
    assert not Path("/tmp/cascadec-pwned").exists()


def test_math_answer_not_applicable_and_extraction():
    assert MathAnswer()([[], []], ["\\boxed{1}", "\\boxed{1}"], answer=[None, "1"]) == [None, 1.0]
    assert mathcheck.boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert mathcheck.boxed("\\boxed{unclosed") is None
    assert mathcheck.final_answer("3/4 of 12 is 9") == "9"


CODE_OK = "<think>easy</think>Here:\n```python\ndef double(x):\n    return 2 * x\n```\n"
CODE_WRONG = "<think>hmm</think>\n```python\ndef double(x):\n    return x + 2\n```\n"
TESTS = ["assert double(2) == 4", "assert double(5) == 10"]


def test_code_tests_in_the_sandbox():
    reward = CodeTests(timeout_s=5)
    later_block = CODE_WRONG + "or\n```python\ndef double(x):\n    return 2 * x\n```\n"
    completions = [CODE_OK, CODE_WRONG, "no code at all", later_block, CODE_OK]
    assert reward([[]] * 5, completions, tests=[TESTS, TESTS, TESTS, TESTS, None]) == [1.0, 0.0, 0.0, 0.0, None]
    # double(2) == 4 holds for x + 2 too: half the tests pass
    assert CodeTests(timeout_s=5, fraction=True)([[]], [CODE_WRONG], tests=[TESTS]) == [0.5]
    hang = "<think>x</think>\n```python\nwhile True:\n    pass\n```"
    assert reward([[]], [hang], tests=[TESTS]) == [0.0]


def test_identical_code_for_the_same_tests_runs_once(monkeypatch):
    from cascadec.runtime.rollout import rewards

    runs = []
    real = rewards.run_tests
    monkeypatch.setattr(rewards, "run_tests", lambda code, tests, **kw: runs.append(code) or real(code, tests, **kw))
    other = ["assert double(3) == 6"]
    got = CodeTests(timeout_s=5)([[]] * 5, [CODE_OK, CODE_OK, CODE_WRONG, CODE_OK, CODE_OK],
                                 tests=[TESTS, TESTS, TESTS, TESTS, other])
    assert got == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert len(runs) == 3  # CODE_OK and CODE_WRONG on TESTS, CODE_OK on the other tests


@pytest.mark.parametrize("length", [0, 79, 80, 81, 90, 99, 100, 101, 1000])
def test_length_penalty_is_magistral_eq1(length):
    l_max, l_cache = 100, 20
    magistral = (0.0 if length <= l_max - l_cache else
                 -0.1 * (length - l_max + l_cache) / l_cache if length <= l_max else -0.1)
    reward = LengthPenalty(max_tokens=l_max, cache_tokens=l_cache)
    value = reward([[]], ["text"], completion_ids=[list(range(length))])[0]
    assert 0.1 * value == pytest.approx(magistral, abs=1e-15)
    assert {80: 0.0, 81: -0.05, 90: -0.5, 100: -1.0, 101: -1.0}.get(length, value) == value


def test_format_gate():
    think = FormatGate(think=True)
    cases = [  # (completion, answer, tests) -> holds
        ("<think>a</think>\\boxed{1}", "1", None, 1.0),
        ("  <think>a</think> the answer is \\boxed{2}", "1", None, 1.0),  # format only, not correctness
        ("<think>a</think> the answer is 1", "1", None, 0.0),  # math needs a box
        ("\\boxed{1}", "1", None, 0.0),  # no thinking
        ("<think>a</think><think>b</think>\\boxed{1}", "1", None, 0.0),  # twice
        ("<think>a \\boxed{1}", "1", None, 0.0),  # never closed
        ("x<think>a</think>\\boxed{1}", "1", None, 0.0),  # does not start with it
        ("<think>a</think>\n```python\nx = 1\n```", None, TESTS, 1.0),
        ("<think>a</think>\n```\nx = 1\n```", None, TESTS, 0.0),  # no language tag
        ("<think>a</think>Paris.", None, None, 1.0),
        ("<think>a</think>   ", None, None, 0.0),  # no answer
    ]
    got = think([[]] * len(cases), [c[0] for c in cases], answer=[c[1] for c in cases], tests=[c[2] for c in cases])
    assert got == [c[3] for c in cases]
    plain = FormatGate(think=False)
    assert plain([[]] * 3, ["\\boxed{3}", "<think>a</think>\\boxed{3}", "3"], answer=["3"] * 3) == [1.0, 0.0, 0.0]


def test_gate_stops_grading(tmp_path, monkeypatch):
    """A broken format scores exactly 0: no other reward sees it, in workers too."""
    seen = tmp_path / "seen.txt"
    monkeypatch.setenv("CASCADEC_TEST_SEEN", str(seen))
    rewards = build_rewards({"format": {"kind": "format"}, "math": {"kind": "math_answer"},
                             "spy": {"kind": "reward_function", "function": "test_rewards:seen_by_workers", "weight": 0.2},
                             "length": {"kind": "length", "max_tokens": 8, "cache_tokens": 4}})
    completions = ["<think>a</think>\\boxed{4}", "\\boxed{4}", "<think>b</think>\\boxed{5}"]
    ids = [[1] * 3, [1] * 20, [1] * 7]
    for workers in (0, 2):
        seen.unlink(missing_ok=True)
        scores = score(rewards, [[]] * 3, completions, {"answer": ["4"] * 3, "completion_ids": ids}, workers=workers)
        assert scores == {"format": [1.0, 0.0, 1.0], "math": [1.0, None, 0.0], "spy": [0.5, None, 0.5],
                          "length": [0.0, None, -0.75]}
        assert seen.read_text().splitlines() == [completions[0], completions[2]]
    weights = {k: w for k, (_, w) in rewards.items()}
    assert weights == {"format": 0.1, "math": 0.9, "spy": 0.2, "length": 0.1}
    assert total(scores, weights) == pytest.approx([0.1 + 0.9 + 0.1, 0.0, 0.1 + 0.1 - 0.075], abs=1e-12)


def test_callable_reward_with_none():
    reward = CallableReward("test_rewards:only_tagged")
    rewards = {"tagged": (reward, 1.0)}
    scores = score(rewards, [[]] * 3, ["yes yes", "yes", "no"], {"tag": ["x", "y", "x"]}, workers=0)
    assert scores == {"tagged": [2.0, None, 0.0]}
    assert total(scores, {"tagged": 1.0}) == [2.0, None, 0.0]


class Completion:  # what the generation engine returns (text and ids), as far as rewards look
    def __init__(self, text, ids):
        self.text, self.ids = text, ids


def test_score_in_workers_equals_in_process():
    rewards = build_rewards({"format": {"kind": "format"}, "math": {"kind": "math_answer"},
                             "code": {"kind": "code_tests", "timeout_s": 5},
                             "length": {"kind": "length", "max_tokens": 30, "cache_tokens": 10},
                             "tagged": {"kind": "reward_function", "function": "test_rewards:only_tagged"}})
    base = [("<think>t</think>\\boxed{4}", "4", None), ("<think>t</think>\\boxed{5}", "4", None),
            (CODE_OK, None, TESTS), (CODE_WRONG, None, TESTS), ("<think>yes</think>yes", None, None),
            ("broken \\boxed{4}", "4", None), ("<think>t</think>\\boxed{\\frac{8}{2}}", "4", None)]
    items = [base[i % len(base)] for i in range(14)]
    completions = [Completion(text, list(range(5 * i))) for i, (text, _, _) in enumerate(items)]
    columns = {"answer": [a for _, a, _ in items], "tests": [t for _, _, t in items],
               "tag": ["x" if i % 3 else "y" for i in range(14)]}
    serial = score(rewards, [[]] * 14, completions, columns, workers=0)
    assert score(rewards, [[]] * 14, completions, columns, workers=2) == serial
    assert serial["math"][:7] == [1.0, 0.0, None, None, None, None, 1.0]
    assert serial["code"][:7] == [None, None, 1.0, 0.0, None, None, None]
    assert serial["format"][:7] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert [v for i, v in enumerate(serial["length"]) if v is not None] == \
        [LengthPenalty(30, 10).value(5 * i) for i in range(14) if items[i][0] != "broken \\boxed{4}"]


@pytest.mark.parametrize(("function", "message"), [
    ("crashes", "reward 'r' (test_rewards:crashes) raised ZeroDivisionError: float division by zero at "
                f"{__file__}:{crashes.__code__.co_firstlineno + 1}, scoring completions 0..1"),
    ("too_few", "reward 'r' (test_rewards:too_few) returned 1 values for 2 completions; "
                "it must return one float or None per completion"),
    ("not_finite", "reward 'r' (test_rewards:not_finite) returned nan for completion 0; "
                   "a reward is a finite float, or None when it does not apply"),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_reward_is_a_located_error(function, message, workers):
    rewards = {"r": (CallableReward(f"test_rewards:{function}"), 1.0)}
    with pytest.raises(RewardError) as e:
        score(rewards, [[], []], ["a", "b"], {}, workers=workers)
    assert str(e.value) == message


def test_the_plan_s_rewards_build_with_magistral_weights():
    """specs/ministral3.yaml's grpo-stem: the plan carries every resolved reward option, and the
    runtime builds exactly those rewards (the compiler and runtime share cascadec/rewarding.py)."""
    from cascadec.compile import compile_file

    repo = Path(__file__).resolve().parents[2]
    stage = next(s for s in compile_file(str(repo / "specs" / "ministral3.yaml")).plan["stages"]
                 if s["id"] == "grpo/ministral-3-3b/reasoning/grpo-stem")
    assert stage["config"]["judges"] == {
        "format": {"kind": "format", "think": True, "weight": 0.1},
        "math": {"kind": "math_answer", "weight": 0.9},
        "code": {"kind": "code_tests", "timeout_s": 10, "memory_mb": 2048, "fraction": False, "weight": 0.9},
        "length": {"kind": "length", "max_tokens": 65536, "cache_tokens": 13107, "weight": 0.1}}
    assert stage["config"]["generation"]["max_new_tokens"] == 65536
    assert stage["provenance"]["config.judges.length.max_tokens"] == "default: generation.max_new_tokens"
    rewards = build_rewards(stage["config"]["judges"])
    assert {k: (r, w) for k, (r, w) in rewards.items()} == {
        "format": (FormatGate(think=True), 0.1), "math": (MathAnswer(), 0.9),
        "code": (CodeTests(timeout_s=10, memory_mb=2048, fraction=False), 0.9),
        "length": (LengthPenalty(max_tokens=65536, cache_tokens=13107), 0.1)}


def test_kinds_that_give_no_reward_are_refused():
    with pytest.raises(ValueError) as e:
        build_rewards({"pwrm": {"kind": "pairwise_model"}})
    assert str(e.value) == ("judge 'pwrm' of kind pairwise_model cannot give a GRPO reward: the kinds that can "
                            "are format, math_answer, code_tests, length, rubric_model, reward_function")


def test_builtin_tasks_are_graded_by_the_stock_rewards():
    """runtime/data/tasks.py writes answers in the rewards' conventions: its reference responses
    earn the full Magistral reward (1.0 with thinking), its wrong ones only the format's 0.1."""
    from cascadec.runtime.data import tasks

    rewards = build_rewards({"format": {"kind": "format"}, "math": {"kind": "math_answer"},
                             "code": {"kind": "code_tests", "timeout_s": 10}})
    weights = {k: w for k, (_, w) in rewards.items()}
    problems = [p for t in tasks.TASKS for p in tasks.problems(t, "heldout", 2)]
    prompts = [[{"role": "user", "content": p.prompt}] for p in problems]
    columns = {"answer": [p.answer for p in problems], "tests": [p.tests and list(p.tests) for p in problems]}
    right = score(rewards, prompts, [p.response(think=True) for p in problems], columns, workers=2)
    wrong = score(rewards, prompts, [p.response(think=True, final=p.wrong) for p in problems], columns, workers=2)
    assert total(right, weights) == pytest.approx([1.0] * len(problems))
    assert total(wrong, weights) == pytest.approx([0.1] * len(problems))
    plain = score({"format": (FormatGate(think=False), 0.1)}, prompts, [p.response() for p in problems], columns,
                  workers=0)
    assert plain == {"format": [1.0] * len(problems)}
