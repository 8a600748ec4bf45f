"""Judges in the spec: the `callable` kind, the LM judge's `template`, the `compare_rewards` kind, and their
located errors (CSC300-CSC307, CSC309)."""

from __future__ import annotations

import pytest

from cascadec import judging
from test_author_mistakes import edit, outcome, stage

PWRM = ("  pwrm: {source: {hub: org/pwrm}, arch: {family: mistral, layers: 2, hidden: 256, ffn: 512, heads: 4, "
        "kv_heads: 2, head_dim: 64, vocab: 1000}}\n")
BASE = edit(
    ("data: {web:", PWRM + "data: {web:"),
    ('format: chat}}', 'format: chat},\n  prompts: {kind: jsonl, paths: ["data/prompts/*.jsonl"], format: prompts}}'),
    ("children:\n", "judges:\n  JUDGE\nchildren:\n"),
) + """\
    variants:
      chat:
        - {name: odpo, kind: odpo, from: short, data: prompts, prompts: 1K, seq_len: 2048, judge: USE}
"""
ODPO = "odpo/small/chat/odpo"
CALLABLE_HELP = 'add `function: "my_module:my_judge"`, a function f(prompts, a, b, **columns) -> P(a beats b) per pair'
TEMPLATE_HELP = ("the template shows `{{ conversation }}` and the answers `{{ a }}` and `{{ b }}`, and ends where the "
                 'judge answers A or B (docs/runtime.md, "Preference optimisation")')


def spec(judge: str, use: str = "j") -> str:
    return BASE.replace("JUDGE", judge).replace("USE", use)


def test_a_callable_judge_is_planned_with_its_function_and_no_model_input():
    diags, plan = outcome(spec('j: {kind: callable, function: "rules.judges:prefer_shorter", temperature: 0.5}'))
    assert diags == []
    s = stage(plan, ODPO)
    assert s["config"]["judges"] == {"j": {"kind": "callable", "function": "rules.judges:prefer_shorter",
                                           "temperature": 0.5}}
    assert not any(i["role"].startswith("judge:") for i in s["inputs"])


def test_an_lm_judge_template_and_batch_size_reach_the_plan_and_the_hash():
    template = "{{ conversation }}\\nA: {{ a }}\\nB: {{ b }}\\nBetter answer:"
    diags, plan = outcome(spec(f'j: {{kind: pairwise_model, model: pwrm, template: "{template}", batch_size: 4}}'))
    assert diags == []
    s = stage(plan, ODPO)
    assert s["config"]["judges"]["j"] == {"kind": "pairwise_model", "template": template.replace("\\n", "\n"),
                                          "batch_size": 4}
    assert {"model": "pwrm", "role": "judge:j"} in s["inputs"]
    _, other = outcome(spec(f'j: {{kind: pairwise_model, model: pwrm, template: "{template} ", batch_size: 4}}'))
    assert stage(other, ODPO)["hash"] != s["hash"]


@pytest.mark.parametrize("judge, use, expected", [
    ("j: {kind: callable}", "j",
     [f"15:6: error[CSC300]: judge 'j' of kind callable has no `function` | {CALLABLE_HELP}"]),
    ('j: {kind: callable, function: "rules.judges.prefer"}', "j",
     ["15:33: error[CSC301]: judge 'j': `function` 'rules.judges.prefer' is not `module:function` | "
      'write the dotted module path, a colon, then the function name: "my_pkg.judges:prefer"']),
    ('j: {kind: callable, function: "rules:prefer-shorter"}', "j",
     ["15:33: error[CSC301]: judge 'j': `function` 'rules:prefer-shorter' is not `module:function` | "
      'write the dotted module path, a colon, then the function name: "my_pkg.judges:prefer"']),
    ('j: {kind: pairwise_model, model: pwrm, function: "rules:prefer"}', "j",
     ["15:42: error[CSC301]: judge 'j': `function` is for judges of kind callable or reward_function, not "
      "pairwise_model | set `kind: callable` (a pairwise judge, odpo) or `kind: reward_function` (a grpo reward), "
      "or remove `function`"]),
    ('j: {kind: pairwise_model, model: pwrm, template: "{{ a }} or {{ c }}?"}', "j",
     ["15:52: error[CSC302]: judge 'j': bad `template`: the template uses 'c'; it may use conversation, "
      f"messages, a, b | {TEMPLATE_HELP}"]),
    ('j: {kind: pairwise_model, model: pwrm, template: "{{ conversation }} {{ a }}"}', "j",
     ["15:52: error[CSC302]: judge 'j': bad `template`: the template never shows answer B (`{{ b }}`) | "
      f"{TEMPLATE_HELP}"]),
    ('j: {kind: pairwise_model, model: pwrm, template: "{{ a }} {% if %} {{ b }}"}', "j",
     ["15:52: error[CSC302]: judge 'j': bad `template`: line 1 of the template: Expected an expression, got "
      f"'end of statement block' | {TEMPLATE_HELP}"]),
    ('{j: {kind: callable, function: "r:f"}, m: {kind: math_answer, template: "{{ a }}"}}', "j",
     ["15:65: error[CSC302]: judge 'm': `template` is the prompt of a pairwise_model or rubric_model judge, not of "
      "math_answer | remove `template`"]),
    ('j: {kind: callable, function: "rules:prefer", model: pwrm}', "j",
     ["15:49: error[CSC303]: judge 'j' of kind callable takes no `model` | "
      "a callable judge loads what it needs itself; remove `model`"]),
    ("{j: {kind: callable, function: \"r:f\"}, m: {kind: math_answer}}", "m",
     ["24:99: error[CSC304]: odpo 'small/chat/odpo' is judged by 'm', a math_answer reward; odpo needs a pairwise "
      "judge | name a judge of kind pairwise_model, callable or compare_rewards; math_answer scores one answer "
      "(grpo), a compare_rewards judge compares two by such rewards"]),
    ("j: {kind: pairwise_model}", "j",
     ["15:6: error[CSC222]: judge 'j' of kind pairwise_model needs a `model` | add `model: <a model name>`"]),
], ids=["no-function", "dots-only", "bad-name", "function-on-model", "unknown-variable", "missing-b",
        "syntax", "template-on-reward", "callable-with-model", "odpo-reward-judge", "model-kind-no-model"])
def test_judge_mistakes_are_located_errors(judge, use, expected):
    diags, plan = outcome(spec(judge, use))
    assert diags == expected and plan is None


# -- compare_rewards: a pairwise judge built from grpo's rewards ----------------------------------
REWARDS = "fmt: {kind: format, think: false}, math: {kind: math_answer, weight: 0.5}, code: {kind: code_tests}"
KINDS = "format, math_answer, code_tests, length, rubric_model, reward_function"


def compare(judge: str, rewards: str = REWARDS, step: str = "") -> str:
    text = spec("{j: " + judge + ", " + rewards + "}")
    return text.replace("judge: j}", "judge: j" + step + "}") if step else text


def test_a_compare_rewards_judge_brings_its_rewards_resolved_into_the_odpo_plan():
    diags, plan = outcome(compare("{kind: compare_rewards, rewards: [fmt, math, code]}"))
    assert diags == []
    s = stage(plan, ODPO)
    assert s["config"]["judges"] == {
        "j": {"kind": "compare_rewards", "rewards": ["fmt", "math", "code"], "temperature": 0.1},
        "fmt": {"kind": "format", "think": False, "weight": 0.1},
        "math": {"kind": "math_answer", "weight": 0.5},
        "code": {"kind": "code_tests", "weight": 0.9, "timeout_s": 4.0, "memory_mb": 300, "fraction": False}}
    assert s["provenance"]["config.judges.j.temperature"] == "default"
    assert s["provenance"]["config.judges.code.timeout_s"] == "default"
    assert not any(i["role"].startswith("judge:") for i in s["inputs"])
    # a reward's weight is part of the judge: changing it reruns the stage
    _, other = outcome(compare("{kind: compare_rewards, rewards: [fmt, math, code]}",
                               REWARDS.replace("weight: 0.5", "weight: 0.6")))
    assert stage(other, ODPO)["hash"] != s["hash"]
    _, given = outcome(compare("{kind: compare_rewards, rewards: [math], temperature: 0.25}"))
    assert stage(given, ODPO)["config"]["judges"] == {
        "j": {"kind": "compare_rewards", "rewards": ["math"], "temperature": 0.25},
        "math": {"kind": "math_answer", "weight": 0.5}}
    assert "config.judges.j.temperature" not in stage(given, ODPO)["provenance"]


def test_a_length_penalty_totalled_by_an_odpo_judge_takes_the_step_s_max_new_tokens():
    diags, plan = outcome(compare("{kind: compare_rewards, rewards: [math, len]}", "math: {kind: math_answer}, "
                                  "len: {kind: length}"))
    assert diags == []
    assert stage(plan, ODPO)["config"]["judges"]["len"] == {"kind": "length", "weight": 0.1, "max_tokens": 1024,
                                                            "cache_tokens": 204}
    assert stage(plan, ODPO)["config"]["generation"]["max_new_tokens"] == 1024
    diags, _ = outcome(compare("{kind: compare_rewards, rewards: [math, len]}", "math: {kind: math_answer}, "
                               "len: {kind: length, max_tokens: 2000}"))
    assert diags == ["15:47: warning[CSC333]: the length penalty 'len' starts at 1,600 tokens, but odpo "
                     "'small/chat/odpo' generates at most 1,024 (generation.max_new_tokens): it never applies | "
                     "lower max_tokens of 'len' to at most 1,024 (its default), or raise generation.max_new_tokens"]


@pytest.mark.parametrize("judge, rewards, step, expected", [
    ("{kind: compare_rewards}", REWARDS, "",
     [f"15:7: error[CSC305]: judge 'j' of kind compare_rewards names no rewards | add `rewards: [<judge>, ...]`, "
      f"judges of kind {KINDS}; P(a beats b) = sigmoid((R_a - R_b)/T) over their weighted total"]),
    ("{kind: compare_rewards, rewards: []}", REWARDS, "",
     [f"15:40: error[CSC305]: judge 'j' of kind compare_rewards names no rewards | add `rewards: [<judge>, ...]`, "
      f"judges of kind {KINDS}; P(a beats b) = sigmoid((R_a - R_b)/T) over their weighted total"]),
    ("{kind: compare_rewards, rewards: [fmt, maths]}", REWARDS, "",
     ["15:46: error[CSC217]: unknown judge 'maths' | did you mean 'math'? known: code, fmt, j, math"]),
    ("{kind: compare_rewards, rewards: [math, other]}", REWARDS + ', other: {kind: callable, function: "r:f"}', "",
     ["15:47: error[CSC306]: judge 'j' totals 'other', a callable judge; compare_rewards totals rewards that score "
      f"one answer each | name judges of kind {KINDS}; a pairwise judge cannot be one of them (no nesting)"]),
    ("{kind: compare_rewards, rewards: [math, inner]}", REWARDS + ", inner: {kind: compare_rewards, rewards: [fmt]}",
     "", ["15:47: error[CSC306]: judge 'j' totals 'inner', a compare_rewards judge; compare_rewards totals rewards "
          f"that score one answer each | name judges of kind {KINDS}; a pairwise judge cannot be one of them "
          "(no nesting)"]),
    ('{kind: callable, function: "r:f", rewards: [math]}', REWARDS, "",
     ["15:41: error[CSC307]: judge 'j': `rewards` lists what a compare_rewards judge totals; a callable judge takes "
      "none | set `kind: compare_rewards`, or remove `rewards` (a grpo step names its rewards on the step)"]),
    ("{kind: compare_rewards, rewards: [math], model: pwrm}", REWARDS, "",
     ["15:48: error[CSC303]: judge 'j' of kind compare_rewards takes no `model` | it compares the totals of its "
      "`rewards`; remove `model`"]),
    ("{kind: compare_rewards, rewards: [math], weight: 2}", REWARDS, "",
     ["15:48: error[CSC331]: judge 'j': `weight` is a grpo reward's, and a compare_rewards judge is not one | "
      "remove `weight`; a pairwise judge compares two answers (odpo), it is not summed"]),
    ("{kind: compare_rewards, rewards: [math, thinks]}", REWARDS + ", thinks: {kind: format}", ", strip_thinking: true",
     ["24:118: error[CSC309]: odpo 'small/chat/odpo' strips the thinking before judging, so the format gate 'thinks' "
      "of judge 'j' (think: true) never sees a `<think>` block: every answer fails it and every pair ties | set "
      "`think: false` on 'thinks' (the answer alone is checked), or `strip_thinking: false` on the step (the "
      "rewards read past `</think>` themselves)"]),
], ids=["no-rewards", "empty-rewards", "unknown-reward", "pairwise-reward", "nested", "rewards-on-callable",
        "model", "weight", "stripped-think-gate"])
def test_compare_rewards_mistakes_are_located_errors(judge, rewards, step, expected):
    diags, plan = outcome(compare(judge, rewards, step))
    assert diags == expected and plan is None


def test_a_rubric_reward_totalled_by_an_odpo_judge_brings_its_judge_model_as_an_input():
    diags, plan = outcome(compare("{kind: compare_rewards, rewards: [math, rub]}",
                                  REWARDS + ", rub: {kind: rubric_model, model: pwrm, mode: soft}"))
    assert diags == []
    s = stage(plan, ODPO)
    assert {"model": "pwrm", "role": "judge:rub"} in s["inputs"]
    assert s["config"]["judges"]["rub"] == {"kind": "rubric_model", "mode": "soft", "weight": 1.0,
                                            "template": judging.RUBRIC_TEMPLATE, "answers": [" Yes", " No"],
                                            "temperature": 1.0, "batch_size": 16}
    assert set(s["config"]["judges"]) == {"j", "math", "rub"}


def test_a_format_gate_without_think_may_judge_stripped_answers():
    diags, plan = outcome(compare("{kind: compare_rewards, rewards: [fmt, math]}", step=", strip_thinking: true"))
    assert diags == [] and stage(plan, ODPO)["config"]["strip_thinking"] is True


def test_grpo_refuses_a_compare_rewards_judge_as_a_reward():
    text = compare("{kind: compare_rewards, rewards: [math]}").replace(
        "{name: odpo, kind: odpo, from: short, data: prompts, prompts: 1K, seq_len: 2048, judge: j}",
        "{name: grpo, kind: grpo, from: short, data: prompts, prompts: 1K, seq_len: 2048, rewards: [math, j]}")
    diags, plan = outcome(text)
    assert plan is None and diags == [
        "24:108: error[CSC330]: grpo 'small/chat/grpo' is rewarded by 'j', a compare_rewards judge; a grpo reward "
        "scores one answer | name judges of kind format, math_answer, code_tests, length, rubric_model, "
        "reward_function; compare_rewards judges compare two answers (odpo)"]
