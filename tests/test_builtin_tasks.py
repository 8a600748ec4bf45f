"""`builtin: tasks` sources in the plan: defaults written out, only what the spec says about
other sources (no new keys in their plans), exact errors."""

from __future__ import annotations

from test_author_mistakes import BASE, edit, outcome

TASKS = edit(("  chats: {kind: jsonl, paths: [\"data/chat/*.jsonl\"], format: chat}}",
              "  chats: {kind: jsonl, paths: [\"data/chat/*.jsonl\"], format: chat},\n"
              "  sft: {kind: builtin, builtin: tasks, format: chat, think: true},\n"
              "  held: {kind: builtin, builtin: tasks, split: heldout, format: prompts, tasks: [function, expr]}}"),
             text=BASE)


def test_the_plan_writes_out_the_tasks_and_names_only_what_was_said():
    diags, plan = outcome(TASKS)
    assert plan is not None, diags
    assert plan["data"]["sft"] == {"kind": "builtin", "builtin": "tasks", "format": "chat", "think": True,
                                   "tasks": ["expr", "sort", "reverse", "function"], "paths": [], "field": None,
                                   "split": None, "mix": {}, "stream": False, "shuffle": True, "tokens": None}
    assert plan["data"]["held"]["tasks"] == ["function", "expr"] and "think" not in plan["data"]["held"]
    assert "tasks" not in plan["data"]["web"] and "think" not in plan["data"]["web"]


def test_a_misnamed_task_is_located_with_a_suggestion():
    diags, plan = outcome(TASKS.replace("tasks: [function, expr]", "tasks: [function, reversal]"))
    assert plan is None
    assert diags == ["10:92: error[CSC360]: data 'held': unknown task 'reversal' | "
                     "did you mean 'reverse'? the built-in tasks are expr, sort, reverse, function"]
