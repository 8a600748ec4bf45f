"""Task accuracy: generate answers to held-out prompts with the engine, grade them with the rewards,
and report per task greedy accuracy, pass@k, mean length and loop rate.

The eval stage runs it for an `eval.harness` task `{tasks: DATA}` (lower.harness writes its
settings out: k, temperature, top_p, max_new_tokens, limit, seed,
batch_size); `evaluate` is the function.

Per prompt: one greedy answer (temperature 0), and ``n`` sampled answers at the set temperature
(``n = k`` by default). An answer is correct when the rewards say so: the math checker for a record
with an ``answer`` (the last ``\\boxed{}`` or number, after any ``</think>``, equals it after
normalisation), the sandboxed code tests for one with ``tests`` (every test passes). Per task:

- ``accuracy``: the share of prompts whose greedy answer is correct;
- ``pass@1`` and ``pass@k``: the unbiased estimator of Chen et al. (2021, "Evaluating Large
  Language Models Trained on Code", eq. 1). With ``c`` of ``n`` samples correct,
  ``pass@k = E[1 − C(n−c, k) / C(n, k)]`` over prompts, computed as
  ``1 − ∏_{i=n−c+1}^{n} (1 − k/i)`` (no huge binomials; exactly 1 when ``n − c < k``). With
  ``n = k`` it is the share of prompts with at least one correct sample; pass@1 is the mean c/n;
- ``length``: mean generated tokens of the greedy answers (EOS included), ``sample_length`` of the
  samples; ``loop_rate`` / ``sample_loop_rate``: the share the loop detector flagged;
- ``prompts``: how many were scored.

``all`` holds the same metrics over every prompt (prompts of each task count equally when the
tasks have equal counts, as the builtin tasks do). Sample i of prompt j is drawn with engine key
``j·n + i``, so the figures depend only on the checkpoint, the prompts and the settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

METRICS = ("accuracy", "pass@1", "pass@k", "length", "loop_rate", "sample_length", "sample_loop_rate", "prompts")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples: 1 − C(n−c, k)/C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def correct(prompts: Sequence, texts: Sequence[str], *, workers: int = 0) -> list[bool]:
    """Whether each text answers its prompt (a chat.Prompt): the math checker on ``answer``, the
    sandboxed tests on ``tests``. A prompt with neither cannot be graded: ValueError."""
    from ..rollout.rewards import CodeTests, MathAnswer, score

    if missing := [i for i, p in enumerate(prompts) if p.answer is None and not p.tests]:
        raise ValueError(f"task accuracy: prompt {missing[0]} has neither `answer` nor `tests` to grade against")
    columns = {"answer": [p.answer for p in prompts], "tests": [p.tests for p in prompts]}
    scores = score({"answer": (MathAnswer(), 1.0), "tests": (CodeTests(), 1.0)}, [p.messages for p in prompts],
                   list(texts), columns, workers=workers)
    return [(a if a is not None else t) == 1.0 for a, t in zip(scores["answer"], scores["tests"])]


def evaluate(engine, prompts: Sequence, *, k: int = 4, samples: int | None = None, temperature: float = 0.8,
             top_p: float = 1.0, max_new_tokens: int = 32, seed: int = 0, workers: int = 0,
             log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` (METRICS) for ``prompts`` (chat.Prompt; the task is the record's
    ``task`` column, ``all`` without one), plus ``all`` over every prompt."""
    from ..rollout.generate import Sampling

    n = samples or k
    if not prompts:
        raise ValueError("task accuracy: no prompts to score")
    started = time.perf_counter()
    ids = [p.ids for p in prompts]
    greedy = engine.generate(ids, Sampling(temperature=0.0, max_new_tokens=max_new_tokens), seed=seed)
    sampled = engine.generate([x for x in ids for _ in range(n)],
                              Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
                              seed=seed, keys=range(len(ids) * n))
    generated = time.perf_counter()
    right = correct([*prompts, *(p for p in prompts for _ in range(n))],
                    [c.text for c in greedy] + [c.text for c in sampled], workers=workers)
    greedy_ok, sample_ok = right[:len(prompts)], right[len(prompts):]
    tasks: dict[str, list[int]] = {}
    for j, p in enumerate(prompts):
        tasks.setdefault(str(p.columns.get("task", "all")), []).append(j)
    groups = {**tasks, "all": list(range(len(prompts)))}
    out = {}
    for task, rows in groups.items():
        counts = [sum(sample_ok[j * n:(j + 1) * n]) for j in rows]
        draws = [sampled[j * n + i] for j in rows for i in range(n)]
        out[task] = {
            "accuracy": _mean(greedy_ok[j] for j in rows),
            "pass@1": _mean(c / n for c in counts),
            "pass@k": _mean(pass_at_k(n, c, k) for c in counts),
            "length": _mean(len(greedy[j].ids) for j in rows),
            "loop_rate": _mean(greedy[j].looped for j in rows),
            "sample_length": _mean(len(c.ids) for c in draws),
            "sample_loop_rate": _mean(c.looped for c in draws),
            "prompts": len(rows),
        }
    log(f"task accuracy: {len(prompts)} prompts x (1 greedy + {n} samples), generated in "
        f"{generated - started:.1f}s, graded in {time.perf_counter() - generated:.1f}s; "
        + ", ".join(f"{t} {m['accuracy']:.2f} (pass@{k} {m['pass@k']:.2f})" for t, m in out.items()))
    return out


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 6) if values else 0.0


def flat(results: dict[str, dict[str, float]], k: int) -> dict[str, float]:
    """The harness-style row of one checkpoint: ``all``'s metrics unprefixed (``accuracy`` first, the
    report's headline), then ``task/metric``; ``pass@k`` named with its k (``pass@8``)."""
    def name(metric: str) -> str:
        return f"pass@{k}" if metric == "pass@k" else metric

    row = {name(m): v for m, v in results["all"].items()}
    row.update({f"{t}/{name(m)}": v for t, r in results.items() if t != "all" for m, v in r.items()})
    return row


def load_prompts(path: Path, tokenizer) -> list:
    """The prompt records of a generated task file (jsonl, written by harness.generate), rendered
    with ``tokenizer``'s chat template."""
    import json

    from ..data.chat import prompt_record

    return [prompt_record(tokenizer, json.loads(line), f"{path}:{number}", {})
            for number, line in enumerate(Path(path).read_text().splitlines(), 1)]


def run(model_dir: Path, task: dict, prompts_file: Path, *, dtype, device, batch_size: int,
        log: Callable[[str], None] = print) -> dict[str, float]:
    """One `{tasks: DATA}` harness task on the checkpoint ``model_dir``: load, generate, grade."""
    import torch
    import transformers as tf

    from ..rollout.generate import engine
    from ..training.models import load_model

    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(prompts_file, tokenizer)
    model = load_model(model_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        results = evaluate(engine(model, tokenizer, batch_size=batch_size), prompts, k=task["k"],
                           samples=task.get("samples"), temperature=task["temperature"], top_p=task["top_p"],
                           max_new_tokens=task["max_new_tokens"], seed=task["seed"], log=log)
    return flat(results, task["k"])
