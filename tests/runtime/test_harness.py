"""lm-evaluation-harness tasks in the eval stage: generated tasks against the project's own
numbers, local task folders, and clear errors for tasks that cannot run here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from stagekit import context
from tinymodels import save_model

from cascadec.runtime.evaluation import harness
from cascadec.runtime.stages import eval as eval_stage

pytest.importorskip("lm_eval")

DOCS = ["".join(f"    value_{i}_{k} = compute({i}, {k}) + {k * i}\n" for k in range(6 + i % 4)) for i in range(12)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = save_model(tmp_path_factory.mktemp("harness") / "m", "mistral", seed=11)
    m = tf.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.8 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("docs")
    (root / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return {"kind": "jsonl", "paths": [str(root / "d.jsonl")], "field": "text"}


def _nll(model_dir: Path, text: str) -> float:
    """Our own: -log p(text | the tokenizer's BOS) in float64, the whole document in one window."""
    m = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        logp = torch.log_softmax(m(input_ids=ids).logits[0, :-1], -1)
    return -logp.gather(-1, ids[0, 1:, None]).sum().item()


def _stage(tasks, include=()):
    return {"id": "eval/tiny", "kind": "eval", "hash": "test",
            "config": {"checkpoints": ["m"], "data": {"name": "corpus", "offset": 0}, "tokens": 64, "seq_len": 16,
                       "precision": "fp32", "micro_batch": 4, "chunk_tokens": 32,
                       "harness": {"tasks": tasks, "include": list(include), "batch_size": 4}},
            "launch": {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "none"}}


def test_perplexity_task_equals_our_own_loss_in_bits_per_byte(model, docs, corpus, tmp_path):
    ctx = context(tmp_path, _stage([{"generate": "perplexity", "data": "docs", "limit": 10}]), {"checkpoint:m": model},
                  corpus)
    ctx.data["docs"] = docs
    metrics = eval_stage.run(ctx)
    got = json.loads((ctx.out / "eval.json").read_text())["checkpoints"]["m"]["harness"]["cascadec_perplexity_docs"]
    assert metrics["harness"]["m"]["cascadec_perplexity_docs"] == got
    nll = sum(_nll(model, d) for d in DOCS[:10])  # nats
    nbytes = sum(len(d.encode()) for d in DOCS[:10])
    assert got["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    assert got["byte_perplexity"] == pytest.approx(math.exp(nll / nbytes), rel=1e-5)
    words = sum(len(re.split(r"\s+", d)) for d in DOCS[:10])  # the harness's word count
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)


def test_next_line_questions_are_deterministic_and_scored_as_our_own_choice(model, docs, tmp_path):
    task = {"generate": "next_line", "data": "docs", "choices": 3, "limit": 6}
    a = harness.generate(task, docs, tmp_path / "a") / "cascadec_next_line_docs.jsonl"
    b = harness.generate(task, docs, tmp_path / "b") / "cascadec_next_line_docs.jsonl"
    assert a.read_text() == b.read_text()
    questions = [json.loads(line) for line in a.read_text().splitlines()]
    assert 1 <= len(questions) <= 6
    for q in questions:
        assert len(q["choices"]) == 3 and len(set(q["choices"])) == 3
        doc = next(d for d in DOCS if q["context"].splitlines()[0] in d)
        lines = [ln.strip() for ln in doc.splitlines() if len(ln.strip()) >= 12]
        i = next(k for k in range(4, len(lines)) if "\n".join(lines[k - 4:k]) == q["context"])
        assert q["choices"][q["label"]] == lines[i]
    result = harness.run(model, [task], include=[tmp_path / "a"], dtype="float32", device="cpu", batch_size=4,
                         log=lambda m: None)["cascadec_next_line_docs"]
    tok = tf.AutoTokenizer.from_pretrained(model)
    m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).eval()

    def loglik(context: str, continuation: str) -> float:  # the harness's encoding of a pair
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tok(context, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=ids).logits[0], -1)
        return sum(logp[k - 1, whole[k]].item() for k in range(n, len(whole)))

    right = [max(range(3), key=lambda c: loglik(q["context"], "\n" + q["choices"][c])) == q["label"] for q in questions]
    assert result["acc"] == pytest.approx(sum(right) / len(questions))


def _local_task(folder: Path, name: str, dataset_path: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: {dataset_path}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")


def test_a_local_task_folder_runs_through_include(model, docs, corpus, tmp_path):
    folder = tmp_path / "tasks"
    _local_task(folder, "stdlib_local", "json")
    (folder / "stdlib_local.yaml").write_text((folder / "stdlib_local.yaml").read_text().replace(
        "dataset_path: json\n", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs['paths'][0]}\n"))
    ctx = context(tmp_path / "run", _stage([{"task": "stdlib_local", "num_fewshot": None, "limit": 10}], ["tasks"]),
                  {"checkpoint:m": model}, corpus)
    ctx.data["tasks"] = {"kind": "text", "paths": [str(folder / "stdlib_local.yaml")]}
    got = eval_stage.run(ctx)["harness"]["m"]["stdlib_local"]
    nll, nbytes = sum(_nll(model, d) for d in DOCS[:10]), sum(len(d.encode()) for d in DOCS[:10])
    assert got["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)


def test_a_task_whose_dataset_is_not_cached_offline_fails_at_once_naming_it(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _local_task(tmp_path / "t", "needs_hub", "someorg/not-cached")
    with pytest.raises(harness.HarnessError) as e:
        harness.run(model, [{"task": "needs_hub", "num_fewshot": None, "limit": 2}], include=[tmp_path / "t"],
                    dtype="float32", device="cpu", batch_size=4)
    assert str(e.value) == (
        "harness task 'needs_hub' needs the dataset someorg/not-cached, which is not in the local Hugging Face "
        "cache, and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: fetch it on a machine with network "
        "(`hf download --repo-type dataset someorg/not-cached`) and copy the cache here, or drop the task")


def test_a_standard_task_offline_names_its_dataset(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(harness.HarnessError, match=r"^harness task 'hellaswag' needs the dataset Rowan/hellaswag, "):
        harness.run(model, [{"task": "hellaswag", "num_fewshot": 0, "limit": 2}], include=[], dtype="float32",
                    device="cpu", batch_size=4)


def test_an_unknown_task_name_is_refused_with_a_suggestion(model, tmp_path):
    with pytest.raises(harness.HarnessError) as e:
        harness.run(model, [{"task": "hellaswg", "num_fewshot": None, "limit": 2}], include=[], dtype="float32",
                    device="cpu", batch_size=4)
    assert str(e.value).startswith("harness task 'hellaswg' is not a task, group or tag the harness knows "
                                   "(did you mean hellaswag")
