"""The built-in post-training tasks (`builtin: tasks`, runtime/data/tasks.py): exact counts, the same
records every time, train and heldout disjoint, every answer right, and the records each format
hands to chat.py; the docs' example records are the generator's first ones."""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import re

import pytest

from cascadec.runtime.data import chat, readers, tasks
from cascadec.spec import BUILTIN_TASKS


def source(**kw) -> dict:
    return {"kind": "builtin", "builtin": "tasks", **kw}


def digest(problems) -> str:
    return hashlib.sha256(json.dumps([p.__dict__ for p in problems], sort_keys=True).encode()).hexdigest()


def test_the_compiler_and_the_runtime_know_the_same_tasks():
    assert tuple(tasks.GENERATORS) == tasks.TASKS == BUILTIN_TASKS == ("expr", "sort", "reverse", "function")


@pytest.mark.parametrize("task", tasks.TASKS)
def test_exact_counts_distinct_deterministic_and_disjoint(task):
    train, heldout = tasks.problems(task, "train"), tasks.problems(task, "heldout")
    assert (len(train), len(heldout)) == (1000, 100)
    keys_train, keys_heldout = {p.key for p in train}, {p.key for p in heldout}
    assert (len(keys_train), len(keys_heldout)) == (1000, 100)
    assert not keys_train & keys_heldout
    assert {tasks.split_of(task, k) for k in keys_train} == {"train"}
    assert {tasks.split_of(task, k) for k in keys_heldout} == {"heldout"}
    assert digest(tasks.problems(task, "train")) == digest(train)  # the same seed, the same records
    assert tasks.problems(task, "heldout", 10) == heldout[:10]  # a shorter list is a prefix


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(node):
    """An independent evaluator of the expressions (Python's own grammar, our own arithmetic)."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.BinOp):
        return OPS[type(node.op)](evaluate(node.left), evaluate(node.right))
    assert isinstance(node, ast.Constant) and isinstance(node.value, int)
    return node.value


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_every_exact_answer_is_right_and_every_wrong_one_wrong(split):
    for p in tasks.problems("expr", split):
        assert re.fullmatch(r"[1-9]([-+*][1-9]){1,2}", p.key)
        value = evaluate(ast.parse(p.key, mode="eval"))
        assert p.answer == str(value) and p.final == f"\\boxed{{{value}}}" and p.wrong != p.final
        assert p.steps[-1].endswith(f"={value}")  # the worked steps end at the answer
    for p in tasks.problems("sort", split):
        items = json.loads(p.key)
        assert 3 <= len(items) <= 5 and p.answer == str(sorted(items)) and p.wrong != p.final
        assert p.steps == (" <= ".join(map(str, sorted(items))),)
    for p in tasks.problems("reverse", split):
        assert p.key.isalpha() and 3 <= len(p.key) <= 6
        assert p.answer == p.key[::-1] and p.final == f"\\boxed{{{p.key[::-1]}}}" and p.wrong != p.final


def run_function(code: str, test: str) -> bool:
    scope: dict = {}
    exec(code, scope)  # noqa: S102 — the generator's own reference solutions
    try:
        exec(test, scope)  # noqa: S102
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_every_reference_function_passes_its_tests_and_the_wrong_one_fails(split):
    for p in tasks.problems("function", split):
        assert len(p.tests) == 3 and p.final == f"```python\n{p.solution}\n```"
        assert all(run_function(p.solution, t) for t in p.tests), p
        wrong = p.wrong.removeprefix("```python\n").removesuffix("\n```")
        assert not all(run_function(wrong, t) for t in p.tests), p


@pytest.mark.slow
def test_reference_functions_pass_their_hidden_tests_in_the_sandbox():
    """The grading path itself: the sandbox runs the reference of each formula template."""
    from cascadec.runtime.rollout.sandbox import run_tests

    heldout = tasks.problems("function", "heldout")
    shown = {}
    for p in heldout:  # the first problem of each template
        template = re.sub(r"\d+", "N", p.key)
        shown.setdefault(template, p)
    assert len(shown) == len(tasks.FUNCTIONS)
    for p in shown.values():
        results = run_tests(p.solution, list(p.tests))
        assert [r.reason for r in results] == ["passed"] * 3, (p, results)
        wrong = p.wrong.removeprefix("```python\n").removesuffix("\n```")
        assert not all(r.passed for r in run_tests(wrong, list(p.tests)))


def test_the_source_is_one_unit_the_generator_and_records_interleave():
    units = readers.source_files(source(split="heldout", format="prompts"))
    assert units == [("tasks/heldout", tasks.FILE)]
    got = list(readers.records(tasks.FILE, source(split="heldout", format="prompts")))
    assert len(got) == 400
    assert [r["task"] for _, r in got[:8]] == [*BUILTIN_TASKS, *BUILTIN_TASKS]
    assert got[0][0] == "builtin tasks/heldout expr #0" and got[5][0] == "builtin tasks/heldout sort #1"
    first = tasks.problems("function", "heldout")[0]
    assert got[3][1] == {"prompt": first.prompt, "tests": list(first.tests), "task": "function"}
    some = list(readers.records(tasks.FILE, source(split="train", format="chat", tasks=["reverse", "expr"])))
    assert len(some) == 2000 and [r["task"] for _, r in some[:3]] == ["reverse", "expr", "reverse"]
    docs = list(readers.documents(tasks.FILE, source(split="heldout", tasks=["sort"])))
    p = tasks.problems("sort", "heldout")[0]
    assert len(docs) == 100 and docs[0] == p.prompt + "\n" + "\n".join(p.steps) + "\n" + p.final
    with pytest.raises(ValueError, match="unknown task 'sorting'; known: expr, sort, reverse, function"):
        readers.source_files(source(tasks=["sorting"]))


def test_docs_show_the_first_record_of_each_task():
    text = (tasks.FILE.parents[2] / "docs" / "data.md").read_text()
    for task in tasks.TASKS:
        p = tasks.problems(task, "train")[0]
        assert json.dumps(p.response())[1:-1].replace("\\\\", "\\") in text, task
        prompt = tasks.record(p, "prompts")
        shown = json.dumps(prompt)[:-1] if task != "function" else json.dumps({"prompt": p.prompt})[:-1]
        assert shown in text, task
    assert "1,000 problems per task in `train`, 100 per task in `heldout`" in text


@pytest.fixture(scope="module")
def tok():
    from tinymodels import tokenizer

    return tokenizer()


def test_formats_through_chat_py(tok):
    p = tasks.problems("expr", "train")[0]
    ex = next(chat.examples(tasks.FILE, source(format="chat", tasks=["expr"]), tok))
    trained = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m], skip_special_tokens=True)
    assert trained == p.response()  # exactly the assistant's steps and answer are trained
    think = next(chat.examples(tasks.FILE, source(format="chat", tasks=["expr"], think=True), tok))
    trained = tok.decode([i for i, m in zip(think.ids, think.mask) if m], skip_special_tokens=True)
    assert trained == "<think>4*9=36\n4+36=40</think>\\boxed{40}"
    pair = next(chat.examples(tasks.FILE, source(format="preference", tasks=["expr"]), tok))
    rejected = tok.decode([i for i, m in zip(pair.rejected.ids, pair.rejected.mask) if m], skip_special_tokens=True)
    assert rejected == "4*9=36\n4+36=40\n\\boxed{72}"  # 4+4*9 read left to right
    prompts = list(chat.examples(tasks.FILE, source(format="prompts", split="heldout", system="Answer briefly."), tok))
    assert len(prompts) == 400
    assert prompts[0].messages == [{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": tasks.problems("expr", "heldout")[0].prompt}]
    assert (prompts[0].answer, prompts[0].tests, prompts[0].columns) == (
        tasks.problems("expr", "heldout")[0].answer, None, {"task": "expr"})
    assert prompts[3].answer is None and prompts[3].tests == list(tasks.problems("function", "heldout")[0].tests)


def test_a_fallible_teacher_stops_short_in_its_share_of_records_only():
    """`unfinished: 0.5`: a hash-chosen half (±4 points of 4,000) of the chat records end after the
    steps, with no final answer; the rest are untouched; prompts and preference records keep
    their answers; a larger share only adds records."""
    clean = [r for _, r in tasks.records(source(format="chat", think=True))]
    short = [r for _, r in tasks.records(source(format="chat", think=True, unfinished=0.5))]
    problems = list(tasks.interleaved(tasks.TASKS, "train"))
    assert len(clean) == len(short) == len(problems) == 4000
    cut = 0
    for p, a, b in zip(problems, clean, short):
        assert a["messages"][0] == b["messages"][0]
        full, said = a["messages"][1]["content"], b["messages"][1]["content"]
        if tasks.unfinished(p, 0.5):
            cut += 1
            assert said == full[:full.index("</think>") + len("</think>")] and "boxed" not in said and "```" not in said
        else:
            assert said == full
    assert 1840 <= cut <= 2160
    assert all(tasks.unfinished(p, 0.5) for p in problems if tasks.unfinished(p, 0.25))
    plain = [r for _, r in tasks.records(source(format="chat", unfinished=0.5))]
    assert any(r["messages"][1]["content"].endswith("\n") and "boxed" not in r["messages"][1]["content"]
               for r in plain[:40])  # without think: the steps, then nothing
    for fmt in ("prompts", "preference"):
        assert [r for _, r in tasks.records(source(format=fmt, unfinished=0.5))][:50] == \
            [r for _, r in tasks.records(source(format=fmt))][:50]
    with pytest.raises(ValueError, match=r"tasks `unfinished` is a share in \[0, 1\), got 1.0"):
        tasks.settings(source(unfinished=1.0))
