"""What a judge's spec options must look like: the LM judges' prompt templates, a callable's name,
the rewards a compare_rewards judge may total and its default temperature.

Shared by `checks` (errors at plan time), `rewarding` (the rubric judge's defaults), `graph` (the
plan's resolved values) and `cascadec.runtime.rollout.judges` / `rubric` (which render, import and
build them), so the plan refuses exactly what the runtime could not use. Pure, torch-free; jinja2
is imported only when a template is checked or rendered.
"""

from __future__ import annotations

import re

# The names a judge `template` may use (jinja2, rendered in a sandbox with undefined names refused).
TEMPLATE_VARIABLES = {
    "conversation": "the prompt's messages as text, one `Role: content` paragraph each",
    "messages": "the prompt's messages, a list of {role, content}",
    "a": "the answer shown as A",
    "b": "the answer shown as B",
}

# The LM judge reads P(A) against P(B) from its next token after the prompt: the template must end
# where the judge writes its verdict, and the two answers are named by the tokens " A" and " B".
DEFAULT_TEMPLATE = """\
Below is a conversation and two candidate answers to its last message. Judge which answer is \
more helpful, correct and clear.

{{ conversation }}

[Answer A]
{{ a }}
[End of answer A]

[Answer B]
{{ b }}
[End of answer B]

Which answer is better, A or B?
Better answer:"""

# The rubric judge (kind rubric_model, a grpo reward) is asked once per rubric item whether the
# response meets it; P(yes) comes from its next token after the prompt, " Yes" against " No"
# unless the spec's `answers` name other words. docs/rewards.md, "rubric_model".
RUBRIC_VARIABLES = {
    "conversation": "the prompt's messages as text, one `Role: content` paragraph each",
    "messages": "the prompt's messages, a list of {role, content}",
    "question": "the content of the prompt's last user message",
    "response": "the completion with its thinking (`<think>...</think>`) removed",
    "criterion": "one rubric item",
}
RUBRIC_TEMPLATE = """\
Below is a conversation, a response to its last message and one criterion from a grading rubric. \
Judge only whether the response meets the criterion.

{{ conversation }}

[Response]
{{ response }}
[End of response]

[Criterion]
{{ criterion }}
[End of criterion]

Does the response meet the criterion? Answer Yes or No.
Answer:"""
RUBRIC_ANSWERS = (" Yes", " No")  # the tokens read as "met" and "not met"

# What each judge kind's template must show, and may use.
TEMPLATES = {"pairwise_model": (TEMPLATE_VARIABLES, ("a", "b")),
             "rubric_model": (RUBRIC_VARIABLES, ("response", "criterion"))}

# A compare_rewards judge: P(a ≻ b) = σ((R_a − R_b)/T), R the weighted reward total as grpo sums it.
# The rewards live on [0, 1] (a correct, well-formatted answer totals 1.0 by default), so T = 1 would
# give a correct-vs-wrong pair only σ(1) = 0.73; T = 0.1 gives σ(10) = 0.99995, a near-hard label,
# while a difference of one length-penalty step (0.01) stays a soft σ(0.1) = 0.52.
COMPARE = "compare_rewards"
COMPARE_TEMPERATURE = 0.1
# The reward kinds a compare_rewards judge can total: every kind that scores one answer.
COMPARABLE = ("format", "math_answer", "code_tests", "length", "rubric_model", "reward_function")

FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def template_error(template: str, kind: str = "pairwise_model") -> str | None:
    """Why ``template`` cannot be the template of a ``kind`` judge (syntax, unknown names, an answer,
    the response or the criterion left out), or None."""
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        names = meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
    except jinja2.TemplateSyntaxError as e:
        return f"line {e.lineno} of the template: {e.message}"
    variables, required = TEMPLATES[kind]
    unknown = sorted(names - set(variables))
    if unknown:
        return f"the template uses {', '.join(repr(n) for n in unknown)}; it may use {', '.join(variables)}"
    missing = [n for n in required if n not in names]
    if not missing:
        return None
    if kind == "pairwise_model":
        return f"the template never shows answer {' and '.join(missing).upper()} (`{{{{ {missing[0]} }}}}`)"
    return f"the template never shows the {' and the '.join(missing)} (`{{{{ {missing[0]} }}}}`)"
