"""`builtin: tasks` sources and `{tasks: DATA}` task accuracy in the plan: defaults written out,
only what the spec says about other sources (no new keys in their plans), exact errors."""

from __future__ import annotations

from test_author_mistakes import BASE, edit, outcome

TASKS = edit(("  chats: {kind: jsonl, paths: [\"data/chat/*.jsonl\"], format: chat}}",
              "  chats: {kind: jsonl, paths: [\"data/chat/*.jsonl\"], format: chat},\n"
              "  sft: {kind: builtin, builtin: tasks, format: chat, think: true},\n"
              "  held: {kind: builtin, builtin: tasks, split: heldout, format: prompts, tasks: [function, expr]}}"),
             text=BASE) + """\
eval:
  data: web
  tokens: 32K
  seq_len: 128
  harness:
    tasks:
      - {tasks: held}
      - {tasks: held, k: 2, temperature: 0.6, limit: 20}
"""


def test_the_plan_writes_out_the_tasks_and_names_only_what_was_said():
    diags, plan = outcome(TASKS)
    assert plan is not None, diags
    assert plan["data"]["sft"] == {"kind": "builtin", "builtin": "tasks", "format": "chat", "think": True,
                                   "tasks": ["expr", "sort", "reverse", "function"], "paths": [], "field": None,
                                   "split": None, "mix": {}, "stream": False, "shuffle": True, "tokens": None}
    assert plan["data"]["held"]["tasks"] == ["function", "expr"] and "think" not in plan["data"]["held"]
    assert "tasks" not in plan["data"]["web"] and "think" not in plan["data"]["web"]
    ev = next(s for s in plan["stages"] if s["kind"] == "eval")
    assert ev["id"] == "eval/parent" and ev["config"]["harness"]["tasks"] == [
        {"generate": "tasks", "data": "held", "k": 4, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 32,
         "limit": 25, "seed": 0, "batch_size": 64, "checkpoints": ["parent"]},
        {"generate": "tasks", "data": "held", "k": 2, "temperature": 0.6, "top_p": 1.0, "max_new_tokens": 32,
         "limit": 20, "seed": 0, "batch_size": 64, "checkpoints": ["parent"]}]
    # `checkpoints: final` (the default): a child's last phase (and post-training steps), not the pruned model
    child = next(s for s in plan["stages"] if s["id"] == "eval/small")
    assert child["config"]["checkpoints"] == ["small/pruned", "small/short"]
    assert [t["checkpoints"] for t in child["config"]["harness"]["tasks"]] == [["small/short"], ["small/short"]]
    _, every = outcome(TASKS.replace("- {tasks: held}", "- {tasks: held, checkpoints: all}"))
    child = next(s for s in every["stages"] if s["id"] == "eval/small")
    assert [t["checkpoints"] for t in child["config"]["harness"]["tasks"]] == [["small/pruned", "small/short"],
                                                                              ["small/short"]]


def test_a_misnamed_task_is_located_with_a_suggestion():
    diags, plan = outcome(TASKS.replace("tasks: [function, expr]", "tasks: [function, reversal]"))
    assert plan is None
    assert diags == ["10:92: error[CSC360]: data 'held': unknown task 'reversal' | "
                     "did you mean 'reverse'? the built-in tasks are expr, sort, reverse, function"]


def test_task_accuracy_reads_prompts():
    diags, _ = outcome(TASKS.replace("{tasks: held}", "{tasks: sft}"))
    assert diags == ["26:17: error[CSC285]: task accuracy reads prompts records, but data 'sft' holds chat records | "
                     "point `data` at a prompts source, or give it `format: prompts` if its records are prompts "
                     "(docs/data.md)"]


def test_unfinished_reaches_the_plan_only_when_said():
    diags, plan = outcome(TASKS.replace("format: chat, think: true}", "format: chat, think: true, unfinished: 0.25}"))
    assert plan is not None, diags
    assert plan["data"]["sft"]["unfinished"] == 0.25 and "unfinished" not in plan["data"]["held"]
    diags, plan = outcome(TASKS.replace("format: chat, think: true}", "format: chat, think: true, unfinished: 1}"))
    assert plan is None and diags == ["9:79: error[CSC104]: data.sft.unfinished is 1; it must be < 1 | write a number < 1"]
