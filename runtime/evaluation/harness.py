"""lm-evaluation-harness tasks on a checkpoint: the benchmarks the field compares models by.

Owns three things: the tasks cascadec writes itself from a plan data source (`perplexity`,
`next_line`; and `tasks`, whose prompts it writes here and which accuracy.py scores itself: the
harness has no sandbox for code tests), the check that a named task's dataset can be had before anything is loaded (an
offline machine gets a clear error naming the dataset, not a hang), and the call into the
harness with its results reduced to ``{task: {metric: value}}``.

The harness is an optional dependency (`pip install 'cascadec[harness]'`); it is imported only
when a plan asks for harness tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

from ..data.readers import documents, records, source_files

# Dataset loaders of the `datasets` library that read local files named in the task itself.
LOCAL_LOADERS = {"json", "csv", "text", "parquet", "arrow", "pandas"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
NET_TIMEOUT_S = "10"  # huggingface_hub's metadata and download timeouts while the harness runs
METRICS = {"perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"), "next_line": ("acc", "acc_norm")}


class HarnessError(Exception):
    """A harness task that cannot run here; the message names the task and what to do."""


def task_name(task: dict) -> str:
    """The harness name of a plan task: its own, or `cascadec_<kind>_<data>` for a generated one."""
    if "generate" in task:
        return f"cascadec_{task['generate']}_{task['data']}".replace("-", "_").replace(".", "_")
    return task["task"]


# ---------------------------------------------------------------------------------------------
# Generated tasks: a task YAML and its jsonl, written from a data source


def generate(task: dict, source: dict, out: Path) -> Path:
    """Write the task's folder (``<name>.yaml`` + ``<name>.jsonl``) under ``out``; return it."""
    name = task_name(task)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    if task["generate"] == "tasks":  # prompts only: accuracy.py generates and grades, not the harness
        records = _task_prompts(source, task["limit"])
        if not records:
            raise HarnessError(f"task accuracy {name}: data {task['data']!r} gave no prompts to score")
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return folder
    if task["generate"] == "perplexity":
        records = _perplexity_docs(source, task["limit"])
    else:
        records = _next_line_questions(source, task["limit"], task["choices"], seed=task["data"])
    if not records:
        raise HarnessError(f"harness task {name}: data {task['data']!r} gave no documents to score")
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "metadata": {"version": 1.0}}
    if task["generate"] == "perplexity":
        config.update(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                      metric_list=[{"metric": m} for m in METRICS["perplexity"]])
    else:  # the context's last newline is the delimiter between it and each candidate line
        config.update(output_type="multiple_choice", doc_to_text="{{context}}", doc_to_choice="{{choices}}",
                      doc_to_target="{{label}}", target_delimiter="\n",
                      metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                   for m in METRICS["next_line"]])
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return folder


def _task_prompts(source: dict, limit: int) -> list[dict]:
    """The first ``limit`` prompt records of each task (the record's `task`, else one task) of a
    prompts source, with its system prompt written into the messages."""
    from ..data.chat import _prompt_messages

    out, per_task = [], {}
    for _, path in source_files(source):
        for where, record in records(path, source):
            task = str(record.get("task", "all"))
            if per_task.get(task, 0) < limit:
                per_task[task] = per_task.get(task, 0) + 1
                rest = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
                out.append({"messages": _prompt_messages(record, where, source), **rest})
    return out


def _perplexity_docs(source: dict, limit: int) -> list[dict]:
    out = []
    for _, path in source_files(source):
        for text in documents(path, source):
            if text.strip():
                out.append({"text": text})
                if len(out) == limit:
                    return out
    return out


def _next_line_questions(source: dict, limit: int, choices: int, *, seed: str) -> list[dict]:
    """Deterministic questions: a few lines of a document, its true next line, and lines of other
    documents as distractors. Candidate lines are stripped of indentation and at least 12
    characters long, so no choice is told apart by its whitespace or its length alone."""
    docs = [t for _, path in source_files(source) for t in documents(path, source) if t.strip()]
    lines = [[ln.strip() for ln in d.splitlines() if len(ln.strip()) >= 12] for d in docs]
    pool = [(i, ln) for i, ls in enumerate(lines) for ln in ls]
    if len({i for i, _ in pool}) < 2:
        return []
    out = []
    for i, ls in enumerate(lines):
        if len(out) == limit:
            break
        if len(ls) < 5:
            continue
        pos = 4 + _draw(f"{seed}:{i}:pos", len(ls) - 4)
        context, answer = "\n".join(ls[pos - 4:pos]), ls[pos]
        wrong, k = [], 0
        while len(wrong) < choices - 1 and k < 50 * choices:
            j, line = pool[_draw(f"{seed}:{i}:{k}", len(pool))]
            k += 1
            if j != i and line != answer and line not in wrong:
                wrong.append(line)
        if len(wrong) < choices - 1:
            continue
        label = _draw(f"{seed}:{i}:label", choices)
        options = wrong[:label] + [answer] + wrong[label:]
        out.append({"context": context, "choices": options, "label": label})
    return out


def _draw(key: str, n: int) -> int:
    """A uniform-enough integer in [0, n) from a string: the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


# ---------------------------------------------------------------------------------------------
# Running


def needs_harness(tasks: list[dict]) -> bool:
    """Whether any task is scored by lm-evaluation-harness (`{tasks: DATA}` is scored by accuracy.py)."""
    return any(t.get("generate") != "tasks" for t in tasks)


def task_index(include: list[Path]):
    """The harness's task index over its own tasks and ``include``. Building it scans thousands of
    task YAMLs: a stage builds it once, after writing its generated tasks, for all its checkpoints."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include] or None)


def datasets_of(manager, name: str, seen: set | None = None) -> set[tuple[str, str | None]]:
    """(dataset_path, dataset_name) of every task under ``name`` (a task, group or tag)."""
    from lm_eval.tasks._index import Kind

    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    index = manager.task_index
    entry = index.get(name)
    if entry is None:
        raise HarnessError(_unknown(manager, name))
    cfg = entry.cfg or {}
    if entry.kind == Kind.TAG:
        members = [k for k, e in index.items() if name in e.tags]
        return set().union(*(datasets_of(manager, m, seen) for m in members)) if members else set()
    if entry.kind == Kind.GROUP:
        out = set()
        for sub in cfg.get("task") or []:
            sub_name = sub.get("task") if isinstance(sub, dict) else sub
            if isinstance(sub, dict) and "dataset_path" in sub:
                out.add((sub["dataset_path"], sub.get("dataset_name")))
            elif isinstance(sub_name, str):
                out |= datasets_of(manager, sub_name, seen)
        return out
    return {(cfg["dataset_path"], cfg.get("dataset_name"))} if cfg.get("dataset_path") else set()


def _unknown(manager, name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.7)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"harness task {name!r} is not a task, group or tag the harness knows{hint}; name a task of "
            "`lm_eval ls tasks`, or put its YAML in a data source listed in `eval.harness.include`")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def _cached(repo: str) -> bool:
    """Whether the hub dataset ``repo`` is in a local cache the `datasets` library reads offline."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=repo, repo_type="dataset", local_files_only=True)
        return True
    except Exception:  # not in the hub cache: maybe prepared by `datasets` earlier
        from datasets import config

        return any(Path(config.HF_DATASETS_CACHE).glob(repo.replace("/", "___") + "*"))


def check_available(manager, name: str) -> None:
    """Refuse, before loading anything, a task whose hub dataset cannot be had offline."""
    if not _offline():
        return
    for path, sub in sorted(datasets_of(manager, name), key=str):
        if path in LOCAL_LOADERS or Path(path).exists() or _cached(path):
            continue
        raise HarnessError(
            f"harness task {name!r} needs the dataset {path}{f' ({sub})' if sub else ''}, which is not in the "
            f"local Hugging Face cache, and {'/'.join(OFFLINE_VARS)} is set: fetch it on a machine with network "
            f"(`hf download --repo-type dataset {path}`) and copy the cache here, or drop the task")


def run(model_dir: Path, tasks: list[dict], *, include: list[Path], dtype: str, device: str,
        batch_size: int, log=print, index=None) -> dict[str, dict[str, float]]:
    """Every task on the checkpoint ``model_dir``: ``{task: {metric: value}}`` in the plan's order.
    ``index``: a `task_index(include)` to reuse across checkpoints (built here when None)."""
    own = {i: t for i, t in enumerate(tasks) if t.get("generate") == "tasks"}  # scored by accuracy.py
    scored = {i: _accuracy(model_dir, t, include, dtype=dtype, device=device, batch_size=batch_size, log=log)
              for i, t in own.items()}
    tasks = [t for i, t in enumerate(tasks) if i not in own]
    if not tasks:
        return {task_name(t): scored[i] for i, t in own.items()}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise HarnessError("the plan asks for harness tasks, but lm-evaluation-harness is not installed: "
                           "pip install 'cascadec[harness]'") from None
    manager = index if index is not None else task_index(include)
    names = [task_name(t) for t in tasks]
    for name in names:
        check_available(manager, name)
    env = {"HF_HUB_ETAG_TIMEOUT": NET_TIMEOUT_S, "HF_HUB_DOWNLOAD_TIMEOUT": NET_TIMEOUT_S}
    if not sys.stderr.isatty():
        env["TQDM_DISABLE"] = "1"  # a log file or a pipe gets no progress-bar refreshes
    model = HFLM(pretrained=str(model_dir), dtype=dtype, device=device, batch_size=batch_size)
    results = {}
    with _environ(env):
        for task, name in zip(tasks, names):
            spec = {"task": name} if "generate" in task else {"task": name, **(
                {"num_fewshot": task["num_fewshot"]} if task.get("num_fewshot") is not None else {})}
            try:
                out = lm_eval.simple_evaluate(model=model, tasks=[spec["task"]], num_fewshot=spec.get("num_fewshot"),
                                              limit=task.get("limit"), task_manager=manager, log_samples=False,
                                              bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                              torch_random_seed=0, fewshot_random_seed=0)
            except HarnessError:
                raise
            except Exception as e:  # a dataset that would not load, a task that does not build
                sets = ", ".join(p for p, _ in sorted(datasets_of(manager, name), key=str)) or "its data"
                raise HarnessError(f"harness task {name!r} failed ({type(e).__name__}: {e}); "
                                   f"it reads {sets}") from None
            results[name] = reduce(out["results"], name)
            log(f"harness {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()))
    for i, t in own.items():  # back in the plan's order
        results = dict([*list(results.items())[:i], (task_name(t), scored[i]), *list(results.items())[i:]])
    return results


def _accuracy(model_dir: Path, task: dict, include: list[Path], *, dtype: str, device: str, batch_size: int,
              log) -> dict[str, float]:
    """A `{tasks: DATA}` task, from the prompts `generate` wrote into one of the ``include`` folders."""
    import torch

    from . import accuracy

    name = task_name(task)
    found = [f for d in include if (f := Path(d) / name / f"{name}.jsonl").is_file()]
    if not found:
        raise HarnessError(f"task accuracy {name}: its prompts were not generated (no {name}.jsonl under "
                           f"{', '.join(map(str, include)) or 'no folder'})")
    return accuracy.run(model_dir, task, found[0], dtype=getattr(torch, dtype), device=device,
                        batch_size=task.get("batch_size") or batch_size, log=log)


def reduce(raw: dict, name: str) -> dict[str, float]:
    """The harness's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": x, ...}``
    for task ``name`` (a group's own aggregate when it has one, else its subtasks' metrics, prefixed)."""
    def clean(row: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not isinstance(value, (int, float)) or metric == "samples" or "stderr" in metric:
                continue
            out[prefix + (metric if filt in ("", "none") else f"{metric}[{filt}]")] = float(value)
        return out

    mine = clean(raw.get(name) or {})
    if mine:
        return mine
    return {k: v for sub, row in sorted(raw.items()) for k, v in clean(row, f"{sub}/").items()}


@contextlib.contextmanager
def _environ(values: dict):
    """Set environment variables, and the huggingface_hub timeouts it read at import, for a block."""
    from huggingface_hub import constants

    old = {k: os.environ.get(k) for k in values}
    old_const = {k: getattr(constants, k) for k in values if hasattr(constants, k)}
    os.environ.update(values)
    for k in old_const:
        setattr(constants, k, int(values[k]))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for k, v in old_const.items():
            setattr(constants, k, v)
