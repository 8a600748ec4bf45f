"""Task accuracy (runtime/evaluation/accuracy.py): pass@k against hand computations; a planted
engine whose answers are known gives exactly the accuracy, pass@k, length and loop rate it must;
the harness path on a real tiny checkpoint (engine, sandbox, the task file) scores and times it."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from math import comb

import pytest

from cascadec.runtime.data import chat, tasks
from cascadec.runtime.evaluation import accuracy, harness
from cascadec.runtime.rollout.generate import Completion


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 2, Fraction(7, 10)),    # 1 − C(3,2)/C(5,2) = 1 − 3/10
    (8, 1, 4, Fraction(1, 2)),     # 1 − C(7,4)/C(8,4) = 1 − 35/70
    (6, 2, 4, Fraction(14, 15)),   # 1 − C(4,4)/C(6,4) = 1 − 1/15
    (10, 3, 1, Fraction(3, 10)),   # pass@1 is c/n
    (4, 3, 2, Fraction(1)),        # n − c < k: every draw of k holds a correct one
    (4, 0, 4, Fraction(0)),
    (4, 1, 4, Fraction(1)),        # n = k: any correct sample
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert accuracy.pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12)
    assert float(expected) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match=r"pass@k needs 0 <= c <= n and 1 <= k <= n \(got n=4, c=5, k=2\)"):
        accuracy.pass_at_k(4, 5, 2)


class Planted:
    """An engine that answers from a table. Greedy: expr right, function wrong, reverse a loop.
    Samples (key j·n + i is sample i of prompt j): expr right for i < 2, function right for i == 0,
    reverse never. Each completion has one id per character, so lengths are known."""

    def __init__(self, prompts, n):
        self.by_ids = {tuple(p.ids): (j, problem) for j, (p, problem) in enumerate(prompts)}
        self.n = n

    def generate(self, prompts, sampling, *, seed, keys=None):
        keys = range(len(prompts)) if keys is None else keys
        out = []
        for ids, key in zip(prompts, keys):
            j, p = self.by_ids[tuple(ids)]
            if sampling.temperature == 0:
                right = p.task == "expr"
            else:
                assert key // self.n == j, "sample keys are j·n + i"
                i = key % self.n
                right = (p.task == "expr" and i < 2) or (p.task == "function" and i == 0)
            text = p.response(final=p.final if right else p.wrong)
            looped = p.task == "reverse" and sampling.temperature == 0
            if looped:
                text = "ab " * 10
            out.append(Completion(ids=list(range(len(text))), text=text, finish="loop" if looped else "eos",
                                  looped=looped, logprobs=[0.0] * len(text)))
        return out


@pytest.fixture(scope="module")
def tok():
    from tinymodels import tokenizer

    return tokenizer()


@pytest.mark.slow
def test_a_planted_engine_scores_exactly_what_it_must(tok):
    src = {"kind": "builtin", "builtin": "tasks", "split": "heldout", "format": "prompts",
           "tasks": ["expr", "function", "reverse"]}
    prompts = list(chat.examples(tasks.FILE, src, tok))[:9]  # 3 of each, interleaved
    problems = [p for row in zip(*(tasks.problems(t, "heldout")[:3] for t in src["tasks"])) for p in row]
    n, k = 6, 4
    got = accuracy.evaluate(Planted(list(zip(prompts, problems)), n), prompts, k=k, samples=n, log=lambda _: None)
    length = {t: sum(len(p.response()) for p in problems if p.task == t) / 3 for t in ("expr", "function")}
    wrong_len = {t: sum(len(p.response(final=p.wrong)) for p in problems if p.task == t) / 3 for t in src["tasks"]}
    assert got["expr"] == {"accuracy": 1.0, "pass@1": round(2 / 6, 6), "pass@k": round(14 / 15, 6),
                           "length": round(length["expr"], 6), "loop_rate": 0.0,
                           "sample_length": round((2 * length["expr"] + 4 * wrong_len["expr"]) / 6, 6),
                           "sample_loop_rate": 0.0, "prompts": 3}
    assert got["function"] == {"accuracy": 0.0, "pass@1": round(1 / 6, 6), "pass@k": round(2 / 3, 6),
                               "length": round(wrong_len["function"], 6), "loop_rate": 0.0,
                               "sample_length": round((length["function"] + 5 * wrong_len["function"]) / 6, 6),
                               "sample_loop_rate": 0.0, "prompts": 3}
    assert got["reverse"] == {"accuracy": 0.0, "pass@1": 0.0, "pass@k": 0.0, "length": 30.0, "loop_rate": 1.0,
                              "sample_length": round(wrong_len["reverse"], 6), "sample_loop_rate": 0.0, "prompts": 3}
    assert got["all"]["accuracy"] == round(1 / 3, 6) and got["all"]["pass@k"] == round((14 / 15 + 2 / 3) / 3, 6)
    assert got["all"]["prompts"] == 9 and got["all"]["loop_rate"] == round(1 / 3, 6)
    row = accuracy.flat(got, k)
    assert list(row)[:3] == ["accuracy", "pass@1", "pass@4"] and row["function/pass@4"] == round(2 / 3, 6)


def test_a_prompt_with_nothing_to_grade_is_refused(tok):
    prompt = chat.Prompt(ids=[1, 2], messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="task accuracy: prompt 0 has neither `answer` nor `tests`"):
        accuracy.correct([prompt], ["x"])


@pytest.mark.slow
def test_the_harness_path_on_a_random_tiny_checkpoint_scores_zero(tmp_path):
    """Prompts written by harness.generate, the real engine and sandbox: a random model answers
    nothing right (0 where it must), and the figures are well-formed; the wall time is printed."""
    from tinymodels import save_model

    model = save_model(tmp_path / "model")
    src = {"kind": "builtin", "builtin": "tasks", "split": "heldout", "format": "prompts", "name": "held"}
    task = {"generate": "tasks", "data": "held", "k": 2, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 8,
            "limit": 3, "seed": 0}
    folder = harness.generate(task, src, tmp_path / "tasks")
    lines = (folder / "cascadec_tasks_held.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[3])["task"] == "function"
    assert json.loads(lines[0])["messages"] == [{"role": "user", "content": tasks.problems("expr", "heldout")[0].prompt}]
    started = time.perf_counter()
    out = harness.run(model, [task], include=[tmp_path / "tasks"], dtype="float32", device="cpu", batch_size=8,
                      log=print)
    print(f"task accuracy, 12 prompts x (1 + 2) answers of <= 8 tokens: {time.perf_counter() - started:.1f}s")
    row = out["cascadec_tasks_held"]
    assert row["accuracy"] == 0.0 and row["pass@2"] == 0.0 and row["prompts"] == 12
    assert {row[f"{t}/prompts"] for t in tasks.TASKS} == {3}
    assert 0 < row["length"] <= 8 and 0 < row["sample_length"] <= 8
