"""Judges in the spec: the `callable` kind, the LM judge's `template`, and their located errors (CSC300-CSC304)."""

from __future__ import annotations

import pytest
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
      "judge | name a judge of kind pairwise_model or callable; math_answer scores one answer (grpo)"]),
    ("j: {kind: pairwise_model}", "j",
     ["15:6: error[CSC222]: judge 'j' of kind pairwise_model needs a `model` | add `model: <a model name>`"]),
], ids=["no-function", "dots-only", "bad-name", "function-on-model", "unknown-variable", "missing-b",
        "syntax", "template-on-reward", "callable-with-model", "odpo-reward-judge", "model-kind-no-model"])
def test_judge_mistakes_are_located_errors(judge, use, expected):
    diags, plan = outcome(spec(judge, use))
    assert diags == expected and plan is None
