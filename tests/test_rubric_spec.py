"""The `rubric_model` reward in the spec: its options and defaults reach a grpo stage's plan with the
judge's checkpoint as an input, and its mistakes are located errors (CSC302, CSC331, CSC335)."""

from __future__ import annotations

import pytest
from test_author_mistakes import edit, outcome, stage
from test_judge_spec import BASE as ODPO_BASE

from cascadec import judging

BASE = edit((  # test_judge_spec's family, its odpo step made a grpo step rewarded by judge `r`
    "      chat:\n        - {name: odpo, kind: odpo, from: short, data: prompts, prompts: 1K, seq_len: 2048, judge: USE}",
    "      reasoning:\n        - {name: grpo, kind: grpo, from: short, data: prompts, prompts: 1K, seq_len: 2048, "
    "rewards: [r]}"), text=ODPO_BASE)
GRPO = "grpo/small/reasoning/grpo"
RUBRIC_HELP = ("the template shows `{{ response }}` and `{{ criterion }}` (and `{{ conversation }}` or `{{ question }}`), "
               'and ends where the judge answers Yes or No (docs/rewards.md, "rubric_model")')


def spec(judge: str) -> str:
    return BASE.replace("JUDGE", judge)


def test_a_rubric_reward_is_planned_with_its_defaults_and_its_judge_as_an_input():
    diags, plan = outcome(spec("r: {kind: rubric_model, model: pwrm}"))
    assert diags == []
    s = stage(plan, GRPO)
    assert s["config"]["judges"] == {"r": {"kind": "rubric_model", "weight": 1.0, "mode": "hard",
                                           "template": judging.RUBRIC_TEMPLATE, "answers": [" Yes", " No"],
                                           "temperature": 1.0, "batch_size": 16}}
    assert {"model": "pwrm", "role": "judge:r"} in s["inputs"]
    assert {k: v for k, v in s["provenance"].items() if k.startswith("config.judges.")} == {
        f"config.judges.r.{k}": "default" for k in ("weight", "mode", "template", "answers", "temperature", "batch_size")}


def test_rubric_options_reach_the_plan_and_the_hash():
    template = "Q: {{ question }}\\nR: {{ response }}\\nC: {{ criterion }}\\nVerdict:"
    judge = (f'r: {{kind: rubric_model, model: pwrm, mode: soft, answers: [" yes", " no"], temperature: 0.5, '
             f'batch_size: 4, template: "{template}", weight: 0.5}}')
    diags, plan = outcome(spec(judge))
    assert diags == []
    s = stage(plan, GRPO)
    assert s["config"]["judges"]["r"] == {"kind": "rubric_model", "weight": 0.5, "mode": "soft",
                                          "template": template.replace("\\n", "\n"), "answers": [" yes", " no"],
                                          "temperature": 0.5, "batch_size": 4}
    assert not any(k.startswith("config.judges.") for k in s["provenance"])
    _, hard = outcome(spec(judge.replace("mode: soft", "mode: hard")))
    assert stage(hard, GRPO)["hash"] != s["hash"]


def test_pairwise_options_stay_the_pairwise_judges():
    """template, batch_size and temperature are options of pairwise_model judges too (no CSC331 there)."""
    diags, _ = outcome(spec('r: {kind: rubric_model, model: pwrm}\n  p: {kind: pairwise_model, model: pwrm, '
                            'template: "{{ a }} {{ b }} Better answer:", batch_size: 2, temperature: 0.7}'))
    assert diags == []


@pytest.mark.parametrize("judge, expected", [
    ('r: {kind: rubric_model, model: pwrm, template: "{{ response }} Answer:"}',
     ["15:50: error[CSC302]: judge 'r': bad `template`: the template never shows the criterion (`{{ criterion }}`) | "
      + RUBRIC_HELP]),
    ('r: {kind: rubric_model, model: pwrm, template: "{{ a }} {{ criterion }} Answer:"}',
     ["15:50: error[CSC302]: judge 'r': bad `template`: the template uses 'a'; it may use conversation, messages, "
      "question, response, criterion | " + RUBRIC_HELP]),
    ('r: {kind: rubric_model, model: pwrm, answers: [" Yes", " Yes"]}',
     ["15:49: error[CSC335]: judge 'r': `answers` [' Yes', ' Yes'] are not two different words | give the word the "
      "judge writes when the response meets the criterion, then the one when it does not, each as the judge's "
      "tokenizer spells it after `Answer:` (default [' Yes', ' No'])"]),
    ('r: {kind: rubric_model, model: pwrm, answers: [" Yes", " "]}',
     ["15:49: error[CSC335]: judge 'r': `answers` [' Yes', ' '] are not two different words | give the word the "
      "judge writes when the response meets the criterion, then the one when it does not, each as the judge's "
      "tokenizer spells it after `Answer:` (default [' Yes', ' No'])"]),
    ('r: {kind: rubric_model, model: pwrm, mode: fraction}',
     ["15:46: error[CSC104]: judges.r.mode is 'fraction', which is not one of: hard, soft | None"]),
    ('r: {kind: rubric_model, model: pwrm}\n  p: {kind: pairwise_model, model: pwrm, mode: soft}',
     ["16:42: error[CSC331]: judge 'p': `mode` is an option of rubric_model judges, not of pairwise_model | "
      "remove `mode`, or set `kind: rubric_model`"]),
    ('r: {kind: math_answer, template: "{{ response }} {{ criterion }}"}',
     ["15:26: error[CSC302]: judge 'r': `template` is the prompt of a pairwise_model or rubric_model judge, not of "
      "math_answer | remove `template`"]),
    ("r: {kind: rubric_model}",
     ["15:6: error[CSC222]: judge 'r' of kind rubric_model needs a `model` | add `model: <a model name>`"]),
], ids=["no-criterion", "pairwise-variable", "same-answers", "blank-answer", "bad-mode", "mode-on-pairwise",
        "template-on-math", "no-model"])
def test_rubric_mistakes_are_located_errors(judge, expected):
    diags, plan = outcome(spec(judge))
    assert diags == expected and plan is None


def test_the_schema_offers_the_modes_and_answers_the_runtime_reads():
    import json
    from pathlib import Path

    from cascadec import rewarding

    schema = json.loads((Path(__file__).parents[1] / "schemas" / "family.schema.json").read_text())
    judge = schema["$defs"]["judge"]["properties"]
    assert judge["mode"]["enum"] == list(rewarding.RUBRIC_MODES) == ["hard", "soft"]
    assert judge["answers"]["examples"] == [rewarding.OPTIONS["rubric_model"]["answers"]]
