"""What a judge's spec options must look like: the LM judge's prompt template and a callable's name.

Shared by `checks` (errors at plan time) and `cascadec.runtime.rollout.judges` (which renders
and imports them), so the plan refuses exactly what the runtime could not use. Pure, torch-free;
jinja2 is imported only when a template is checked or rendered.
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

FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def template_error(template: str) -> str | None:
    """Why ``template`` cannot be a judge template (syntax, unknown names, an answer left out), or None."""
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        names = meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
    except jinja2.TemplateSyntaxError as e:
        return f"line {e.lineno} of the template: {e.message}"
    unknown = sorted(names - set(TEMPLATE_VARIABLES))
    if unknown:
        return f"the template uses {', '.join(repr(n) for n in unknown)}; it may use {', '.join(TEMPLATE_VARIABLES)}"
    missing = [n for n in ("a", "b") if n not in names]
    if missing:
        return f"the template never shows answer {' and '.join(missing).upper()} (`{{{{ {missing[0]} }}}}`)"
    return None
