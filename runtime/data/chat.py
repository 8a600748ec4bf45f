"""Chat, preference and prompt records for post-training: parsed, rendered with the tokenizer's chat
template, and tokenised into ids plus an assistant-token mask.

Owns the record formats (docs/data.md), the default chat template, and the mask rule: exactly the
tokens of each assistant message's content and the EOS after it are trained (mask 1), nothing else.
It must not know about losses or models; records come from readers.records (same errors, same skips).

Why segments: the rendered conversation is tokenised piece by piece, cut at the assistant spans,
so a token never straddles a prompt/answer boundary. At inference the prompt is tokenised up to
the end of the user turn and the model writes its answer from a token boundary; a tokenisation of
the whole text could merge the template's last prompt character with the answer's first (e.g.
``]`` + ``(``), an input the model never sees when it generates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .formats import DataError
from .readers import Skips, guarded, hint, records

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "preference", "prompts")
TEMPLATE_FILE = "chat_template.jinja"  # where transformers reads a checkpoint's template from

# The default template, written into a checkpoint that has none. Mistral's instruct layout
# (`<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]answer</s>`), with the markers as plain
# text so any tokenizer can render it; `{% generation %}` marks what the mask trains.
DEFAULT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- if system is not none %}[SYSTEM_PROMPT]{{ system }}[/SYSTEM_PROMPT]{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message.role == 'user' %}[INST]{{ message.content }}[/INST]"
    "{%- elif message.role == 'assistant' %}"
    "{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}"
    "{%- else %}{{ raise_exception('roles are system (first), user and assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class Example:
    """One rendered conversation: token ids and the trained-token mask (1 = assistant content or EOS)."""

    ids: list[int]
    mask: list[int]


@dataclass(frozen=True)
class Pair:
    """A preference record: the same prompt completed twice; each mask covers its completion."""

    chosen: Example
    rejected: Example
    prompt_tokens: int  # the shared prefix length (ids[:prompt_tokens] are equal in both)


@dataclass(frozen=True)
class Prompt:
    """A prompt for generation (odpo, grpo, eval), with what a reward checks the completion against."""

    ids: list[int]  # the conversation rendered with the generation prompt
    messages: list[dict]
    answer: str | None = None
    tests: list[str] | None = None
    rubric: list[str] | None = None  # atomic criteria, one string each (a record's string is one item)
    columns: dict = field(default_factory=dict)  # every other field of the record, for rewards

    def fields(self) -> dict:
        """What a reward or judge reads of the record: ``answer``, ``tests``, ``rubric`` and every other field."""
        return {"answer": self.answer, "tests": self.tests, "rubric": self.rubric, **self.columns}


# ---------------------------------------------------------------------------------------------
# Templates


def template_of(tokenizer) -> str:
    """The tokenizer's chat template, or the default one when it has none."""
    return tokenizer.chat_template or DEFAULT_TEMPLATE


def ensure_template(checkpoint: Path) -> bool:
    """Write the default template into ``checkpoint`` when its tokenizer has none; True if written.

    Written as ``chat_template.jinja`` beside the tokenizer files, where `from_pretrained` reads it,
    so the checkpoint's existing tokenizer files are left byte for byte as they are.
    """
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(checkpoint).chat_template:
        return False
    (Path(checkpoint) / TEMPLATE_FILE).write_text(DEFAULT_TEMPLATE)
    return True


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool = False, spans: bool = False):
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, indices = render_jinja_template(
        conversations=[messages], chat_template=template_of(tokenizer), return_assistant_tokens_mask=spans,
        add_generation_prompt=generation_prompt, **tokenizer.special_tokens_map,
    )
    return (texts[0], indices[0]) if spans else texts[0]


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the mask trains.

    A template with ``{% generation %}`` blocks says itself what is trained. For one without, the
    span of assistant message i is what rendering ``messages[:i+1]`` adds to rendering
    ``messages[:i]`` with the generation prompt: the message's content and its end-of-turn.
    """
    if GENERATION_TAG.search(template_of(tokenizer)):
        return _render(tokenizer, messages, spans=True)
    text, spans = _render(tokenizer, messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template renders earlier turns differently once later turns follow, so "
                             "assistant tokens cannot be located; add {% generation %} blocks to the template")
        spans.append((len(before), len(upto)))
    return text, spans


def encode(tokenizer, messages: list[dict]) -> Example:
    """Token ids and mask of a conversation: the text cut at the assistant spans, each piece tokenised."""
    text, spans = assistant_spans(tokenizer, messages)
    ids, mask, at = [], [], 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, trained in ((text[at:start], 0), (text[start:end], 1)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                mask += [trained] * len(piece_ids)
        at = end
    return Example(ids=ids, mask=mask)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids a model generates from: the conversation and the template's generation prompt."""
    return tokenizer(_render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Records


def messages_of(value, where: str, key: str) -> list[dict]:
    """A validated list of {role, content} messages (other keys dropped)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: `{key}` must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            got = (f"role {m.get('role')!r}, content {type(m.get('content')).__name__}" if isinstance(m, dict)
                   else f"a {type(m).__name__}")
            raise DataError(f"{where}: {key}[{i}] must have a `role` ({', '.join(ROLES)}) and a string `content` "
                            f"(got {got})")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: {key}[{i}] is a system message; only the first message may be one")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def _prompt_messages(record: dict, where: str, source: dict) -> list[dict]:
    """The conversation a preference or prompt record starts from: `messages` or a `prompt` string."""
    if "messages" in record:
        messages = messages_of(record["messages"], where, "messages")
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("prompt"), list):
        messages = messages_of(record["prompt"], where, "prompt")
    else:
        raise DataError(f"{where}: no `prompt` (a string or messages) or `messages` "
                        f"(fields: {', '.join(sorted(record))})")
    return _with_system(messages, source.get("system"))


def _completion(record: dict, key: str, where: str) -> str:
    """`chosen`/`rejected`: a string, an assistant message, or a one-message list of it."""
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: `{key}` must be a string or an assistant message "
                        f"({'missing' if key not in record else 'got ' + type(record[key]).__name__})")
    return value


def chat_example(tokenizer, record: dict, where: str, source: dict) -> Example:
    if "messages" not in record:
        raise DataError(f"{where}: no field 'messages' (fields: {', '.join(sorted(record))}); "
                        f"chat records hold a `messages` list of {{role, content}}")
    messages = _with_system(messages_of(record["messages"], where, "messages"), source.get("system"))
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return encode(tokenizer, messages)


def preference_pair(tokenizer, record: dict, where: str, source: dict) -> Pair:
    messages = _prompt_messages(record, where, source)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant message; it must end with the user's turn")
    chosen, rejected = (encode(tokenizer, [*messages, {"role": "assistant", "content": _completion(record, k, where)}])
                        for k in ("chosen", "rejected"))
    shared = next((i for i, (a, b) in enumerate(zip(chosen.ids, rejected.ids)) if a != b),
                  min(len(chosen.ids), len(rejected.ids)))
    return Pair(chosen=chosen, rejected=rejected, prompt_tokens=min(shared, chosen.mask.index(1), rejected.mask.index(1)))


def prompt_record(tokenizer, record: dict, where: str, source: dict) -> Prompt:
    messages = _prompt_messages(record, where, source)
    answer, tests, rubric = record.get("answer"), record.get("tests"), record.get("rubric")  # all optional:
    # a pairwise judge (odpo) needs none; a reward that needs one says so when it scores
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if isinstance(tests, str):
        tests = [tests]
    if (answer is not None and not isinstance(answer, str)) \
            or (tests is not None and not (isinstance(tests, list) and all(isinstance(t, str) for t in tests))):
        raise DataError(f"{where}: `answer` is a string, `tests` a string or a list of strings")
    rest = {k: v for k, v in record.items() if k not in ("prompt", "messages", "answer", "tests", "rubric")}
    return Prompt(ids=prompt_ids(tokenizer, messages), messages=messages, answer=answer, tests=tests,
                  rubric=rubric_items(rubric, where), columns=rest)


def rubric_items(value, where: str) -> list[str] | None:
    """A record's `rubric` as its list of atomic criteria: a string is one criterion (never split, so
    a criterion may hold line breaks), a list holds one per item; None when the record has none."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        got = "an empty list" if isinstance(items, list) else _a(type(value).__name__)
        raise DataError(f"{where}: `rubric` is {got}; write one criterion as a string, or several as a list of "
                        f"strings, or leave `rubric` out")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            got = "empty" if isinstance(item, str) else _a(type(item).__name__)
            name = "`rubric`" if isinstance(value, str) else f"rubric[{i}]"
            raise DataError(f"{where}: {name} is {got}; each rubric item is a non-empty string, one criterion "
                            f"the response meets or not (e.g. \"Mentions the Moon's gravity.\")")
    return list(items)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


PARSERS = {"chat": chat_example, "preference": preference_pair, "prompts": prompt_record}


def examples(path: Path, source: dict, tokenizer, skips: Skips | None = None) -> Iterator:
    """The Examples (chat), Pairs (preference) or Prompts (prompts) of one unit of ``source``.

    A record that does not fit its format is a located DataError, or under ``on_error: skip`` a
    skip counted in ``skips``, exactly as a bad record of a text source.
    """
    fmt = source.get("format")
    if fmt not in PARSERS:
        raise ValueError(f"data format {fmt!r} is not a post-training format; {hint(source, 'format')} "
                         f"to one of {', '.join(FORMATS)}")
    parse = PARSERS[fmt]

    def parsed():
        for where, record in records(path, source, skips):
            try:
                yield parse(tokenizer, record, where, source)
            except DataError as e:
                yield e

    yield from guarded(path, source, skips, parsed())
