"""The teacher-logits cache and the distill stage that reads it: unbiased top-k below the full
vocabulary, and the refusals that keep a cache from being misused (old format, another
temperature, another tokenizer, other tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from stagekit import context, stage, teacher_logits_stage
from test_train import losses, weights

from cascadec.runtime.stages import distill, teacher_logits


@pytest.fixture(scope="module")
def short():
    return stage(steps=2, loss={"kind": "reverse_kl", "temperature": 2.0, "top_k": 20, "ce_weight": 0.0,
                                "chunk_tokens": 24})


@pytest.fixture(scope="module")
def cache(tiny_models, corpus, short, tmp_path_factory):
    """Top-20 of the 320-entry vocabulary, with the rest at τ = 1 and τ = 2."""
    root = tmp_path_factory.mktemp("logits")
    teacher_logits.run(context(root, teacher_logits_stage(short, 20, temperatures=[2.0, 1.0]),
                               {"teacher": tiny_models["teacher"]}, corpus))
    return root / "out"


def _cached(tmp_path, st, student, cache, corpus):
    return context(tmp_path, st, {"student": student, "teacher_logits": cache}, corpus)


def test_cached_topk_below_the_vocabulary_equals_online_topk(tiny_models, corpus, short, cache, tmp_path):
    index = json.loads((cache / "index.json").read_text())
    assert index["format"] == 2 and index["temperatures"] == [1.0, 2.0] and index["top_k"] == 20
    online = context(tmp_path / "online", short, dict(tiny_models), corpus)
    distill.run(online)
    cached = _cached(tmp_path / "cached", short, tiny_models["student"], cache, corpus)
    assert distill.run(cached)["teacher"] == "cached"
    assert losses(cached.out) == pytest.approx(losses(online.out), rel=1e-5)
    a, b = weights(online.out), weights(cached.out)
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def test_a_cache_without_the_rest_logsumexp_is_refused(tiny_models, corpus, short, cache, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(cache, old)
    index = json.loads((old / "index.json").read_text())
    del index["format"], index["temperatures"]
    (old / "index.json").write_text(json.dumps(index))
    st = {**short, "inputs": [{"role": "teacher_logits", "stage": "teacher-logits/tiny/sft"}]}
    with pytest.raises(ValueError, match=r"no teacher log-sum-exp outside the top-k \(written by an older cascadec, "
                                         r"format 1\).*rebuild it: cascadec run PLAN --force 'teacher-logits/tiny/sft'"):
        distill.run(_cached(tmp_path, st, tiny_models["student"], old, corpus))


def test_a_cache_built_for_another_temperature_is_refused(tiny_models, corpus, short, cache, tmp_path):
    st = stage(steps=2, loss={**short["config"]["loss"], "temperature": 0.5})
    with pytest.raises(ValueError, match=r"rest mass at temperature\(s\) 1.0, 2.0; this stage distills at 0.5"):
        distill.run(_cached(tmp_path, st, tiny_models["student"], cache, corpus))


def test_a_student_with_another_tokenizer_is_refused_online_and_cached(tiny_models, corpus, short, cache, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(tiny_models["student"], student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    (student / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    online = context(tmp_path / "online", short, {"student": student, "teacher": tiny_models["teacher"]}, corpus)
    with pytest.raises(ValueError, match=rf"teacher {tiny_models['teacher']} and student {student} have different "
                                         r"tokenizers \(sha256 of the tokenizer files: \w{12} and \w{12}\)"):
        distill.run(online)
    with pytest.raises(ValueError, match=rf"teacher {tiny_models['teacher']} \(logits cached at {cache}\) and "
                                         rf"student {student} have different tokenizers"):
        distill.run(_cached(tmp_path / "cached", short, student, cache, corpus))


def test_a_cache_built_on_other_tokens_is_refused(tiny_models, corpus, short, cache, tmp_path):
    other = tmp_path / "corpus"
    shutil.copytree(Path(corpus["paths"][0]).parent, other)
    (other / "a.jsonl").write_text((other / "a.jsonl").read_text().replace("0:", "zero:", 1))
    edited = {**corpus, "paths": [str(other / "*.jsonl")]}
    with pytest.raises(ValueError, match=r"were built on other tokens than this stage reads \(sha256 of the input "
                                         r"ids \[8, 136\): cache \w{12}, this stage \w{12}\)"):
        distill.run(_cached(tmp_path / "run", short, tiny_models["student"], cache, edited))
