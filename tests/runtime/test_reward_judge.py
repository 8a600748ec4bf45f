"""The compare_rewards judge: P(a ≻ b) = σ((R_a − R_b)/T) over grpo's reward totals, exact values,
ties where no reward applies, code graded in the sandbox, and the rules applied before it is asked."""

from __future__ import annotations

import math

import pytest

from cascadec.runtime.rollout.judges import Candidate, JudgeError, RewardJudge, build_judge, preferences

Q = [{"role": "user", "content": "What is 2 + 2? Put the answer in a box."}]
RIGHT, WRONG, UNBOXED = "2 + 2 = \\boxed{4}", "2 + 2 = \\boxed{5}", "2 + 2 = 4"
FORMAT = {"kind": "format", "think": False, "weight": 0.1}
MATH = {"kind": "math_answer", "weight": 0.9}
RULES = '''
CALLS = []

def none_for_blank(prompts, completions, **columns):
    """1 per completion, None for an empty one."""
    return [None if not c.strip() else 1.0 for c in completions]

def never(prompts, completions, **columns):
    CALLS.append(completions)
    raise AssertionError("asked about a pair the rules decide")
'''


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def judge(rewards: dict, **options):
    """A compare_rewards judge built as odpo builds it, from the plan's `config.judges`."""
    config = {"kind": "compare_rewards", "rewards": list(rewards), **options}
    return build_judge("cmp", config, None, judges={"cmp": config, **rewards})


@pytest.fixture
def rules(tmp_path, monkeypatch):
    (tmp_path / "cmprules.py").write_text(RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import cmprules

    return importlib.reload(cmprules)


def test_p_is_the_sigmoid_of_the_reward_difference_over_the_temperature():
    j = judge({"fmt": FORMAT, "math": MATH})
    assert isinstance(j, RewardJudge) and j.temperature == 0.1  # the plan's default, also when a plan lacks it
    a = [RIGHT, WRONG, RIGHT, WRONG, RIGHT]
    b = [WRONG, RIGHT, RIGHT, WRONG, UNBOXED]
    got = j.prefer([Q] * 5, a, b, [{"answer": "4"}] * 5)
    # totals: right 0.1 + 0.9 = 1.0, wrong 0.1 + 0 = 0.1, unboxed: the format gate fails, grading stops: 0
    assert got == pytest.approx([sig(9), sig(-9), 0.5, 0.5, sig(10)], abs=1e-12)
    assert got[2] == 0.5 and got[3] == 0.5  # equal totals: exactly ½
    assert j.take() == {"fmt": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                        "math": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, None]}
    assert j.take() == {"fmt": [], "math": []}


def test_weights_and_temperature_enter_as_grpo_sums_them():
    half = judge({"fmt": FORMAT, "math": {"kind": "math_answer", "weight": 0.5}}, temperature=0.25)
    assert half.prefer([Q], [RIGHT], [WRONG], [{"answer": "4"}]) == pytest.approx([sig(0.5 / 0.25)], abs=1e-12)
    default_weight = judge({"math": {"kind": "math_answer"}}, temperature=1.0)  # a plan without weight: 0.9
    assert default_weight.prefer([Q], [RIGHT], [WRONG], [{"answer": "4"}]) == pytest.approx([sig(0.9)], abs=1e-12)


def test_swapping_the_answers_gives_one_minus_p():
    j = judge({"fmt": FORMAT, "math": MATH}, temperature=0.3)
    a, b = [RIGHT, WRONG, UNBOXED, RIGHT], [WRONG, UNBOXED, RIGHT, "\\boxed{4.0}"]
    cols = [{"answer": "4"}] * 4
    forward, backward = j.prefer([Q] * 4, a, b, cols), j.prefer([Q] * 4, b, a, cols)
    assert [x + y for x, y in zip(forward, backward)] == pytest.approx([1.0] * 4, abs=1e-15)
    assert forward[3] == 0.5  # 4.0 is 4


def test_a_pair_with_no_applicable_reward_ties(rules):
    j = judge({"math": MATH, "mine": {"kind": "reward_function", "function": "cmprules:none_for_blank", "weight": 1.0}})
    # no `answer`: math does not apply; the function does not apply to a blank answer
    got = j.prefer([Q] * 3, ["  ", "x", "x"], ["y", "  ", "y"], [{}, {}, {"answer": "4"}])
    assert got == [0.5, 0.5, 0.5]  # R = None on one side is a tie, not R = 0 (that would give σ(∓10))
    only_math = judge({"math": MATH})
    assert only_math.prefer([Q] * 2, [RIGHT, RIGHT], [WRONG, WRONG], [{}, {"answer": None}]) == [0.5, 0.5]
    assert only_math.prefer([Q], [RIGHT], [WRONG], None) == [0.5]  # no columns at all


def test_a_code_pair_is_graded_by_the_sandbox():
    # a generous time limit: a loaded machine must not turn the passing function into a timeout
    j = judge({"fmt": FORMAT, "code": {"kind": "code_tests", "weight": 0.9, "timeout_s": 60.0, "memory_mb": 300}})
    good = "Here:\n```python\ndef double(x):\n    return 2 * x\n```"
    bad = "Here:\n```python\ndef double(x):\n    return x + 2\n```"
    tests = ["assert double(2) == 4", "assert double(5) == 10"]
    got = j.prefer([Q] * 2, [good, bad], [bad, good], [{"tests": tests}] * 2)
    assert got == pytest.approx([sig(9), sig(-9)], abs=1e-12)
    assert j.take()["code"] == [1.0, 0.0, 0.0, 1.0]


def test_the_rules_decide_loopers_before_the_rewards_are_asked(rules):
    j = judge({"never": {"kind": "reward_function", "function": "cmprules:never", "weight": 1.0}})
    clean = Candidate(RIGHT, ids=(1, 2))
    looper = Candidate(RIGHT, looped=True, ids=(1, 2))
    cut = Candidate(RIGHT, finish="length", ids=(1, 2))
    assert preferences(j, [Q] * 3, [clean, looper, cut], [looper, clean, looper], columns=[{"answer": "4"}] * 3) \
        == [1.0, 0.0, 0.5]
    assert rules.CALLS == []


def test_the_thinking_is_stripped_and_the_length_penalty_counts_the_generated_tokens():
    j = judge({"math": MATH, "len": {"kind": "length", "weight": 0.1, "max_tokens": 10, "cache_tokens": 5}})
    short = Candidate("<think>3 + 1</think>\\boxed{4}", ids=tuple(range(5)))  # L = 5: no penalty
    long = Candidate("<think>2 + 2</think>\\boxed{4}", ids=tuple(range(10)))  # L = 10: −1
    got = preferences(j, [Q], [short], [long], strip_thinking=True, columns=[{"answer": "4"}])
    assert got == pytest.approx([sig(0.1 / 0.1)], abs=1e-12)
    assert j.take() == {"math": [1.0, 1.0], "len": [0.0, -1.0]}


def test_a_reward_that_fails_names_the_judge(rules):
    j = judge({"math": MATH, "len": {"kind": "length", "weight": 0.1, "max_tokens": 10, "cache_tokens": 5}})
    with pytest.raises(JudgeError) as e:  # text only: the length penalty has no tokens to count
        j.prefer([Q], [RIGHT], [WRONG], [{"answer": "4"}])
    assert str(e.value).startswith("judge 'cmp': reward 'len' (LengthPenalty) raised ValueError: the length reward "
                                   "counts tokens: pass `completion_ids` (or Completion objects) at ")
    bad = judge({"never": {"kind": "reward_function", "function": "cmprules:never", "weight": 1.0}})
    with pytest.raises(JudgeError) as e:
        bad.prefer([Q], [RIGHT], [WRONG])
    assert str(e.value).startswith("judge 'cmp': reward 'never' (cmprules:never) raised AssertionError: asked about "
                                   "a pair the rules decide at ")


def test_a_plan_whose_judges_lack_the_rewards_is_refused():
    with pytest.raises(JudgeError) as e:
        build_judge("cmp", {"kind": "compare_rewards", "rewards": ["math", "fmt"]}, None, judges={"math": MATH})
    assert str(e.value) == ("judge 'cmp' of kind compare_rewards names rewards ['math', 'fmt'] but the plan's judges "
                            "hold ['math']; make the plan again with `cascadec plan`")
