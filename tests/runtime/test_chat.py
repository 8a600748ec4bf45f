"""Chat, preference and prompt records: the assistant mask against a hand-computed expectation with a
tiny BPE, the default template in a checkpoint, the record forms, and located errors for bad records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tinymodels import tokenizer as tiny_tokenizer
from transformers import AutoTokenizer

from cascadec.runtime.data import chat
from cascadec.runtime.data.readers import DataError, Skips

EOS = 2  # tinymodels' tokenizer: <pad> <s> </s> <unk>
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "The sum is 5."},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "It is 8."},
]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    assert t.chat_template is None and t.eos_token_id == EOS
    return t


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mask_is_exactly_the_assistant_content_and_eos(tok):
    prompt1 = enc(tok, "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]What is 2+3?[/INST]")
    answer1 = enc(tok, "The sum is 5.") + [EOS]
    prompt2 = enc(tok, "[INST]And 4+4?[/INST]")
    answer2 = enc(tok, "It is 8.") + [EOS]
    assert prompt1[0] == 1 and len(answer1) > 5  # <s> is one special token; the answer is several

    example = chat.encode(tok, CONVERSATION)

    assert example.ids == prompt1 + answer1 + prompt2 + answer2
    assert example.mask == [0] * len(prompt1) + [1] * len(answer1) + [0] * len(prompt2) + [1] * len(answer2)
    trained = [i for i, m in zip(example.ids, example.mask) if m]
    assert tok.decode(trained) == "The sum is 5.</s>It is 8.</s>"


def test_mask_equals_transformers_assistant_mask_where_tokens_do_not_straddle(tok):
    tok = tiny_tokenizer()
    tok.chat_template = chat.DEFAULT_TEMPLATE
    reference = tok.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True)
    example = chat.encode(tok, CONVERSATION)
    assert (example.ids, example.mask) == (reference["input_ids"], reference["assistant_masks"])


@pytest.mark.parametrize("answer", ["(x)", "!!", "]", " spaced", "\n\nnew lines"])
def test_an_answer_never_shares_a_token_with_the_prompt(tok, answer):
    example = chat.encode(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}])
    prompt = enc(tok, "<s>[INST]q[/INST]")
    assert example.ids == prompt + enc(tok, answer) + [EOS]
    assert example.mask == [0] * len(prompt) + [1] * (len(example.ids) - len(prompt))


def test_template_without_generation_blocks_masks_what_each_assistant_turn_adds(tok):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>\n{% endif %}")
    example = chat.encode(tok, CONVERSATION[1:3])
    prompt = enc(tok, "<user>\nWhat is 2+3?</s>\n<assistant>\n")
    turn = enc(tok, "The sum is 5.</s>\n")  # the template's end of turn is part of the assistant turn
    assert example.ids == prompt + turn
    assert example.mask == [0] * len(prompt) + [1] * len(turn)


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m.content if loop.last else '...' }}{% endfor %}"
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        chat.encode(tok, CONVERSATION[1:4])


def test_default_template_is_written_into_a_checkpoint_without_one(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert chat.ensure_template(tmp_path) is True
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == chat.DEFAULT_TEMPLATE
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before  # untouched
    assert chat.ensure_template(tmp_path) is False  # a template is there now: left alone
    assert chat.encode(loaded, CONVERSATION) == chat.encode(tok, CONVERSATION)


def test_chat_records_from_jsonl_and_parquet_with_the_source_system_prompt(tok, tmp_path):
    records = [{"messages": CONVERSATION[1:3], "id": 1}, {"messages": CONVERSATION, "id": 2}]
    write_jsonl(tmp_path / "c.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    import datasets

    from cascadec.runtime.data.readers import source_files

    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "ds")
    source = {"kind": "jsonl", "format": "chat", "system": "Be brief."}
    from_jsonl = list(chat.examples(tmp_path / "c.jsonl", source, tok))
    from_parquet = list(chat.examples(tmp_path / "c.parquet", {**source, "kind": "parquet"}, tok))
    saved = {**source, "kind": "dataset", "paths": [str(tmp_path / "ds")]}
    from_dataset = [e for _, p in source_files(saved) for e in chat.examples(p, saved, tok)]
    full = chat.encode(tok, CONVERSATION)
    first_turns = chat.encode(tok, CONVERSATION[:3])  # the system prompt was added to record 1
    assert from_jsonl == from_parquet == from_dataset == [first_turns, full]


def test_preference_records_in_both_forms_give_the_same_pair(tok, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"},
        {"messages": [{"role": "user", "content": "What is 2+3?"}],
         "chosen": [{"role": "assistant", "content": "5"}], "rejected": {"role": "assistant", "content": "6"}},
    ])
    a, b = chat.examples(tmp_path / "p.jsonl", {"kind": "jsonl", "format": "preference"}, tok)
    assert a == b
    prompt = enc(tok, "<s>[INST]What is 2+3?[/INST]")
    assert a.chosen.ids == prompt + enc(tok, "5") + [EOS] and a.rejected.ids == prompt + enc(tok, "6") + [EOS]
    assert a.chosen.mask == a.rejected.mask == [0] * len(prompt) + [1, 1]
    assert a.prompt_tokens == len(prompt)


def test_prompt_records_keep_what_rewards_check(tok, tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "What is 2+3?", "answer": 5, "level": "easy"},
        {"messages": [{"role": "user", "content": "Write f."}], "tests": "assert f() == 1"},
        {"prompt": "Explain gravity.", "rubric": "Mentions mass.\nNames Newton."},
        {"prompt": "Tell a joke."},  # for a pairwise judge (odpo): nothing to check against
        {"prompt": "Explain tides.", "rubric": ["Mentions the Moon's gravity.", "Says there are two a day."]},
    ])
    source = {"kind": "jsonl", "format": "prompts", "system": "Think."}
    math, code, essay, joke, tides = chat.examples(tmp_path / "q.jsonl", source, tok)
    assert (joke.answer, joke.tests, joke.rubric) == (None, None, None)
    assert math.ids == enc(tok, "<s>[SYSTEM_PROMPT]Think.[/SYSTEM_PROMPT][INST]What is 2+3?[/INST]")
    assert (math.answer, math.tests, math.rubric, math.columns) == ("5", None, None, {"level": "easy"})
    assert code.tests == ["assert f() == 1"] and code.messages[0] == {"role": "system", "content": "Think."}
    assert essay.rubric == ["Mentions mass.\nNames Newton."] and essay.answer is None  # a string: one item, unsplit
    assert tides.rubric == ["Mentions the Moon's gravity.", "Says there are two a day."]


BAD = [
    ("chat", {"text": "hi"}, "no field 'messages' (fields: text); chat records hold a `messages` list of {role, content}"),
    ("chat", {"messages": [{"role": "user"}]},
     "messages[0] must have a `role` (system, user, assistant) and a string `content` (got role 'user', content NoneType)"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages[1] is a system message; only the first message may be one"),
    ("chat", {"messages": [{"role": "user", "content": "a"}]}, "no assistant message, so nothing to train on"),
    ("preference", {"prompt": "a", "chosen": "b"}, "`rejected` must be a string or an assistant message (missing)"),
    ("preference", {"chosen": "b", "rejected": "c"},
     "no `prompt` (a string or messages) or `messages` (fields: chosen, rejected)"),
    ("prompts", {"prompt": "a", "answer": ["5"]}, "`answer` is a string, `tests` a string or a list of strings"),
    ("prompts", {"prompt": "a", "rubric": []},
     "`rubric` is an empty list; write one criterion as a string, or several as a list of strings, or leave `rubric` out"),
    ("prompts", {"prompt": "a", "rubric": {"a": 1}},
     "`rubric` is a dict; write one criterion as a string, or several as a list of strings, or leave `rubric` out"),
    ("prompts", {"prompt": "a", "rubric": ["Is short.", 3]},
     "rubric[1] is an int; each rubric item is a non-empty string, one criterion the response meets or not "
     "(e.g. \"Mentions the Moon's gravity.\")"),
    ("prompts", {"prompt": "a", "rubric": ["Is short.", "  "]},
     "rubric[1] is empty; each rubric item is a non-empty string, one criterion the response meets or not "
     "(e.g. \"Mentions the Moon's gravity.\")"),
    ("prompts", {"prompt": "a", "rubric": ""},
     "`rubric` is empty; each rubric item is a non-empty string, one criterion the response meets or not "
     "(e.g. \"Mentions the Moon's gravity.\")"),
]


@pytest.mark.parametrize("fmt, record, message", BAD, ids=[m[:30] for _, _, m in BAD])
def test_bad_records_are_located_errors(tok, tmp_path, fmt, record, message):
    write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as e:
        list(chat.examples(tmp_path / "d.jsonl", {"kind": "jsonl", "format": fmt}, tok))
    assert str(e.value) == f"{tmp_path / 'd.jsonl'}:1: {message}"


def test_bad_records_are_counted_when_skipped(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}, {"text": "x"}, [1], {"messages": CONVERSATION[:3]}])
    skips = Skips()
    got = list(chat.examples(tmp_path / "d.jsonl", {"kind": "jsonl", "format": "chat", "on_error": "skip"}, tok, skips))
    assert got == [chat.encode(tok, CONVERSATION), chat.encode(tok, CONVERSATION[:3])]
    assert skips.total == 2 and [m.split(": ", 1)[0] for m in skips.first] == [f"{tmp_path / 'd.jsonl'}:2", f"{tmp_path / 'd.jsonl'}:3"]
