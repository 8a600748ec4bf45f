"""The eval stage: on the stage's device, in the plan's precision, through the chunked cross-entropy
(never the full logits), spread over processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from stagekit import context
from tinymodels import save_model

from cascadec.runtime import executor
from cascadec.runtime.data.stream import open_stream
from cascadec.runtime.stages import eval as eval_stage
from cascadec.runtime.training.kd import IGNORE_INDEX, nll_sum

SEQ, TOKENS = 16, 16 * 21  # 21 sequences: an odd count, so two processes get unequal shares


def _realistic(path: Path, *, tied: bool, dtype=torch.float32) -> Path:
    """A saved checkpoint whose RMSNorm gains are not 1 (some negative), as a trained model's are."""
    model = tf.AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.8 * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return {
        "untied": _realistic(save_model(root / "untied", "mistral", seed=3), tied=False),
        "tied": _realistic(save_model(root / "tied", "mistral", seed=4, tied=True), tied=True),
        "bf16": _realistic(save_model(root / "bf16", "mistral", seed=5), tied=False, dtype=torch.bfloat16),
    }


def _stage(names, precision="fp32", devices=1, chunk_tokens=24):
    return {"id": "eval/tiny", "kind": "eval", "hash": "test",
            "config": {"checkpoints": names, "data": {"name": "corpus", "offset": 0}, "tokens": TOKENS,
                       "seq_len": SEQ, "precision": precision, "micro_batch": 4, "chunk_tokens": chunk_tokens},
            "launch": {"devices": devices, "nodes": 1, "launcher": "local", "strategy": "none"}}


def _reference(path: Path, corpus: dict, cache: Path) -> float:
    """Mean next-token loss from the model's own full logits, in float64."""
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    stream = open_stream(corpus, tf.AutoTokenizer.from_pretrained(path), path, cache, TOKENS, log=lambda m: None)
    ids = torch.stack([stream.read(i * SEQ, (i + 1) * SEQ) for i in range(TOKENS // SEQ)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_chunked_nll_equals_the_full_logit_cross_entropy_in_float64():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (50,), generator=g)
    labels[[3, 17, 49]] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    want = torch.nn.functional.cross_entropy((hidden.double() @ weight.double().T)[keep], labels[keep], reduction="sum")
    for chunk in (1, 7, 47, 50, 1000):
        total, count = nll_sum(hidden, weight, labels, chunk)
        assert count == 47
        assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_eval_matches_full_logits_and_never_applies_the_head_to_every_token(checkpoints, corpus, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the eval stage must not compute full logits")

    monkeypatch.setattr(tf.MistralForCausalLM, "forward", refuse)
    ctx = context(tmp_path / "run", _stage(["untied", "tied"]), {f"checkpoint:{k}": checkpoints[k] for k in ("untied", "tied")},
                  corpus, cache=tmp_path / "cache")
    metrics = eval_stage.run(ctx)
    monkeypatch.undo()
    report = json.loads((ctx.out / "eval.json").read_text())
    assert report["precision"] == "fp32" and report["processes"] == 1
    for name in ("untied", "tied"):
        want = _reference(checkpoints[name], corpus, tmp_path / "cache")
        assert report["checkpoints"][name]["tokens"] == (TOKENS // SEQ) * (SEQ - 1)
        assert report["checkpoints"][name]["loss"] == pytest.approx(want, abs=2e-6)
        assert metrics["checkpoints"][name] == report["checkpoints"][name]["loss"]


def test_bf16_eval_loads_bf16_weights_and_stays_within_bf16_tolerance(checkpoints, corpus, tmp_path, monkeypatch):
    seen = []
    load = eval_stage.load_model
    monkeypatch.setattr(eval_stage, "load_model", lambda path, dtype: seen.append(dtype) or load(path, dtype=dtype))
    names = ["bf16", "untied"]
    fp32 = context(tmp_path / "fp32", _stage(names), {f"checkpoint:{k}": checkpoints[k] for k in names}, corpus,
                   cache=tmp_path / "cache")
    bf16 = context(tmp_path / "bf16", _stage(names, "bf16"), {f"checkpoint:{k}": checkpoints[k] for k in names}, corpus,
                   cache=tmp_path / "cache")
    a, b = eval_stage.run(fp32)["checkpoints"], eval_stage.run(bf16)["checkpoints"]
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert json.loads((bf16.out / "eval.json").read_text())["precision"] == "bf16"
    for name in names:  # bf16 weights, activations and logits: ~3 significant digits
        assert b[name] == pytest.approx(a[name], rel=2e-2)
        assert b[name] != a[name]


@pytest.mark.slow
def test_two_processes_score_disjoint_shares_and_match_one(checkpoints, corpus, tmp_path):
    names = ["untied", "tied"]
    inputs = {f"checkpoint:{k}": checkpoints[k] for k in names}
    one = context(tmp_path / "one", _stage(names), inputs, corpus, cache=tmp_path / "cache")
    eval_stage.run(one)
    two_stage = _stage(names, devices=2)
    two = context(tmp_path / "two", two_stage, inputs, corpus, cache=tmp_path / "cache")
    two.scratch.mkdir(parents=True)
    lines = []
    two.log = lines.append
    assert executor.needs_launcher(two_stage)
    executor._spawn(two)
    a = json.loads((one.out / "eval.json").read_text())
    b = json.loads((two.out / "eval.json").read_text())
    assert b["processes"] == 2, "\n".join(lines[-40:])
    for name in names:
        assert b["checkpoints"][name]["tokens"] == a["checkpoints"][name]["tokens"]
        assert b["checkpoints"][name]["loss"] == pytest.approx(a["checkpoints"][name]["loss"], abs=2e-6)


def _contexts_stage(names, trained):
    """The plan's eval at two lengths over the same 336 tokens: 21 sequences of 16, 7 of 48."""
    st = _stage(names)
    st["config"].update(contexts=[{"seq_len": SEQ, "tokens": TOKENS, "micro_batch": 4},
                                  {"seq_len": 3 * SEQ, "tokens": TOKENS, "micro_batch": 2}],
                        trained_context=trained)
    return st


def test_two_contexts_equal_two_single_context_evals_and_mark_the_longer(checkpoints, corpus, tmp_path):
    names = ["untied", "tied"]
    inputs = {f"checkpoint:{k}": checkpoints[k] for k in names}
    both = context(tmp_path / "both", _contexts_stage(names, {"untied": SEQ, "tied": None}), inputs, corpus,
                   cache=tmp_path / "cache")
    metrics = eval_stage.run(both)
    got = json.loads((both.out / "eval.json").read_text())["checkpoints"]
    singles = {}
    for seq_len, micro in ((SEQ, 4), (3 * SEQ, 2)):
        st = _stage(names)
        st["config"].update(seq_len=seq_len, micro_batch=micro)
        one = context(tmp_path / f"one-{seq_len}", st, inputs, corpus, cache=tmp_path / "cache")
        eval_stage.run(one)
        singles[seq_len] = json.loads((one.out / "eval.json").read_text())["checkpoints"]
    for name in names:
        for seq_len in (SEQ, 3 * SEQ):
            score, single = got[name]["contexts"][str(seq_len)], singles[seq_len][name]
            assert (score["loss"], score["perplexity"], score["tokens"]) == (single["loss"], single["perplexity"], single["tokens"])
        assert got[name]["contexts"][str(3 * SEQ)]["tokens"] == 7 * (3 * SEQ - 1)
        # the first length is the headline, exactly as a single-length eval reports it
        assert {k: got[name][k] for k in ("loss", "perplexity", "tokens", "params")} == singles[SEQ][name]
        assert metrics["contexts"][name] == {str(n): singles[n][name]["loss"] for n in (SEQ, 3 * SEQ)}
    assert got["untied"]["trained_context"] == SEQ
    assert [got["untied"]["contexts"][str(n)]["beyond_trained"] for n in (SEQ, 3 * SEQ)] == [False, True]
    assert [got["tied"]["contexts"][str(n)]["beyond_trained"] for n in (SEQ, 3 * SEQ)] == [False, False]  # unknown: unmarked
    assert got["untied"]["contexts"][str(SEQ)]["loss"] != got["untied"]["contexts"][str(3 * SEQ)]["loss"]
