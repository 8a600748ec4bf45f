"""The sft stage: the trained-token labels of packed conversations, packing (best-fit decreasing,
epochs), packed = unpacked, the KD term against its formula, the top-k cache over packed rows,
bf16, `cascadec run` on a written spec, SIGKILL then resume, and two processes against one."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stagekit import kill_then_resume
from surgery_util import edit, random_norms, to_bf16
from test_chat import CONVERSATION
from test_train import _ctx_json
from tinymodels import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from cascadec.runtime import executor
from cascadec.runtime.context import StageContext
from cascadec.runtime.data import chat
from cascadec.runtime.data.packing import IGNORE_INDEX, PackedRows, RowOrder, best_fit_decreasing
from cascadec.runtime.data.stream import open_stream
from cascadec.runtime.stages import sft, teacher_logits
from cascadec.runtime.training.kd import LossSpec
from cascadec.runtime.training.train import Objective



def conversations(n: int = 40, seed: int = 0) -> list[dict]:
    """Arithmetic chats of one or two turns (lengths vary, so packing has work to do)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        messages = [{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The sum is {a + b}."}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "And times 2?"},
                         {"role": "assistant", "content": f"It is {2 * (a + b)}. " + "Done. " * (i % 4)}]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    return {"kind": "jsonl", "paths": [str(root / "*.jsonl")], "format": "chat", "system": "Be brief.", "name": "chat"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Teacher (untied) and student (tied head), both with trained-looking norm gains."""
    root = tmp_path_factory.mktemp("sft-models")
    return {"teacher": edit(save_model(root / "teacher", "mistral", seed=1), random_norms),
            "student": edit(save_model(root / "student", "qwen3", seed=2, tied=True, layers=2, hidden=32, ffn=64,
                                       heads=2, kv_heads=1), lambda t: random_norms(t, seed=3))}


SFT = {
    "id": "sft/tiny/instruct/sft", "kind": "sft", "hash": "test",
    "config": {
        "seq_len": 96, "global_batch": 4, "micro_batch": 2, "steps": 6,
        "data": {"name": "chat", "offset": 0, "shuffle": True},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "top_k": None, "ce_weight": 0.0, "chunk_tokens": 40,
                 "teacher": False},
        "assistant_only": True,
        "optimizer": {"name": "adamw", "lr": 3e-3, "min_lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 1}, "checkpoint": {"every_steps": 2, "keep": 2},
        "seed": 0, "precision": "fp32",
    },
}


def sft_stage(**config) -> dict:
    st = copy.deepcopy(SFT)
    for key, value in config.items():
        st["config"][key] = {**st["config"][key], **value} if isinstance(value, dict) and key == "loss" else value
    c = st["config"]
    c["tokens"] = c["steps"] * c["seq_len"] * c["global_batch"]
    return st


def context(tmp: Path, st: dict, inputs: dict, source: dict, cache: Path) -> StageContext:
    (tmp / "out").mkdir(parents=True, exist_ok=True)
    return StageContext(stage=st, inputs=inputs, data={"chat": source}, out=tmp / "out", scratch=tmp / "scratch",
                        cache=cache, log=lambda msg: None)


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def shards_of(source: dict, model_dir: Path, cache: Path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return open_stream(source, tok, model_dir, cache, None, log=lambda m: None).shards, tok


# ---------------------------------------------------------------------------------------------
# Labels and packing


def test_labels_train_exactly_the_assistant_tokens_and_eos_of_a_conversation(models, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    source = {"kind": "jsonl", "paths": [str(tmp_path / "c.jsonl")], "format": "chat"}
    shards, tok = shards_of(source, models["student"], tmp_path / "cache")
    assert shards.chat and shards.index["documents"] == 1

    rows = PackedRows(shards, 128, pad_id=0)
    ids, positions, labels = rows.row(0)
    n = len(shards)
    # token by token: a target exactly where the next token is assistant content or its EOS
    pieces = [tok.decode([t]) for t in ids[:n]]
    text = "".join(pieces)
    assert text == ("<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]What is 2+3?[/INST]The sum is 5.</s>"
                    "[INST]And 4+4?[/INST]It is 8.</s>")
    answers = [(text.index("The sum is 5."), text.index("[INST]And")), (text.index("It is 8."), len(text))]
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    in_answer = [any(a <= s < b for a, b in answers) for s in starts]
    for t in range(128):
        expected = ids[t + 1] if t + 1 < n and in_answer[t + 1] else IGNORE_INDEX
        assert labels[t] == expected, (t, pieces[t:t + 2])
    trained = [int(x) for x in labels if x != IGNORE_INDEX]
    assert tok.decode(trained) == "The sum is 5.</s>It is 8.</s>"
    assert positions.tolist() == list(range(n)) + list(range(128 - n))  # the padding restarts too
    assert ids[n:].tolist() == [0] * (128 - n)

    everything = PackedRows(shards, 128, pad_id=0, assistant_only=False).row(0)[2]
    assert everything[:n - 1].tolist() == ids[1:n].tolist() and set(everything[n - 1:].tolist()) == {IGNORE_INDEX}


def test_best_fit_decreasing_by_hand():
    # sorted 7(2) 6(5) 5(0) 4(4) 3(1) 2(3): 7 opens A (room 3), 6 opens B (4), 5 opens C (5), 4 fills B,
    # 3 fills A, 2 goes to C (the only room left)
    offsets, members = best_fit_decreasing(np.array([5, 3, 7, 2, 4, 6]), 10)
    assert offsets.tolist() == [0, 2, 4, 6] and members.tolist() == [2, 1, 5, 4, 0, 3]
    offsets, members = best_fit_decreasing(np.array([4, 4, 4]), 4)  # full rows are closed
    assert offsets.tolist() == [0, 1, 2, 3] and members.tolist() == [0, 1, 2]


def test_packing_keeps_whole_conversations_truncates_long_ones_and_scatters_rows(chats, models, tmp_path):
    shards, _ = shards_of(chats, models["student"], tmp_path / "cache")
    rows = PackedRows(shards, 64, pad_id=0)
    lengths = np.diff(np.concatenate([[0], shards.document_ends()]))
    assert rows.examples == 40 and rows.truncated == int((lengths > 64).sum()) > 0
    segments = []  # the conversations of every row, by their restarting positions (padding is all pad ids)
    for k in range(rows.rows):
        ids, positions, _ = rows.row(k)
        starts = np.append(np.flatnonzero(positions == 0), 64)
        segments += [ids[a:b] for a, b in zip(starts[:-1], starts[1:]) if (ids[a:b] != 0).any()]
    whole = [shards.read(s, s + n) for s, n in zip(np.concatenate([[0], shards.document_ends()[:-1]]),
                                                    np.minimum(lengths, 64))]
    assert sorted(map(bytes, map(np.ndarray.tobytes, segments))) == sorted(map(bytes, map(np.ndarray.tobytes, whole)))
    assert rows.tokens == int(np.minimum(lengths, 64).sum())
    assert rows.tokens > 0.9 * rows.rows * 64  # best-fit fills the rows
    assert sorted({rows.stride * k % rows.rows for k in range(rows.rows)}) == list(range(rows.rows))
    again = PackedRows(shards, 64, pad_id=0)
    assert all(np.array_equal(a, b) for k in range(rows.rows) for a, b in zip(rows.row(k), again.row(k)))


def test_row_order_repeats_the_rows_in_epochs_each_in_its_own_seeded_order():
    order = RowOrder(5, 12, seed=3, shuffle=True)
    visits = [order(p) for p in range(12)]
    assert sorted(visits[:5]) == sorted(visits[5:10]) == list(range(5)) and visits[:5] != visits[5:10]
    assert visits == [RowOrder(5, 12, seed=3, shuffle=True)(p) for p in range(12)]  # deterministic
    assert [RowOrder(5, 3, seed=0, shuffle=False)(p) for p in range(3)] == [0, 1, 2]  # a budget below the data
    assert order.epochs(12) == 2.4


# ---------------------------------------------------------------------------------------------
# Packed = unpacked (fp32): the restarting position ids give a block-diagonal mask


def _examples(shards, k: int = 3):
    ends = shards.document_ends()[:k]
    starts = np.concatenate([[0], ends[:-1]])
    mask_rows = [(shards.read(s, e), shards.mask(s, e)) for s, e in zip(starts, ends)]
    return mask_rows


def _row(parts, seq_len: int):
    """Conversations (ids, mask) in one row, positions restarting, built here independently of packing.py."""
    ids, pos = torch.zeros(seq_len, dtype=torch.long), torch.zeros(seq_len, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX)
    at = 0
    for tokens, mask in parts:
        n = len(tokens)
        ids[at:at + n], pos[at:at + n] = torch.from_numpy(tokens), torch.arange(n)
        labels[at:at + n - 1] = torch.where(torch.from_numpy(mask[1:]) == 1, torch.from_numpy(tokens[1:]), IGNORE_INDEX)
        at += n
    pos[at:] = torch.arange(seq_len - at)
    return ids, pos, labels


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("teacher", [False, True], ids=["ce", "kd+ce"])
@pytest.mark.parametrize("trained", ["student", "teacher"], ids=["tied-qwen3", "untied-mistral"])
def test_a_packed_row_gives_the_loss_and_gradients_of_the_examples_unpacked(chats, models, tmp_path, attention,
                                                                            teacher, trained):
    shards, _ = shards_of(chats, models["student"], tmp_path / "cache")
    parts = _examples(shards)
    seq_len = sum(len(t) for t, _ in parts) + 5
    student = AutoModelForCausalLM.from_pretrained(models[trained], attn_implementation=attention).float()
    t_model = AutoModelForCausalLM.from_pretrained(models["teacher"], attn_implementation=attention).float().eval()
    spec = LossSpec(kind="forward_kl", temperature=2.0, ce_weight=0.3, chunk_tokens=16)
    objective = Objective(student, spec)

    def loss_and_grads(ids, pos, labels):
        student.zero_grad()
        extra = {}
        if teacher:
            with torch.no_grad():
                extra = {"hidden": t_model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state,
                         "weight": t_model.get_output_embeddings().weight}
        loss = objective(ids, labels, pos, **extra)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}

    packed = loss_and_grads(*(x[None] for x in _row(parts, seq_len)))
    alone = [_row([p], seq_len) for p in parts]
    unpacked = loss_and_grads(*(torch.stack(x) for x in zip(*alone)))
    torch.testing.assert_close(packed[0], unpacked[0], rtol=1e-5, atol=1e-5)
    for name in packed[1]:
        torch.testing.assert_close(packed[1][name], unpacked[1][name], rtol=1e-5, atol=1e-5, msg=name)
    # the control: the same row with positions running on attends across examples and differs
    ids, _, labels = _row(parts, seq_len)
    crossed = loss_and_grads(ids[None], torch.arange(seq_len)[None], labels[None])
    assert abs(float(crossed[0]) - float(packed[0])) > 1e-4


# ---------------------------------------------------------------------------------------------
# The stage


def _formula(models, ctx, spec: LossSpec, step_rows: list[list[int]]):
    """The first step's loss by hand: full logits, τ² KL(p‖q) and CE per trained token, one mean
    over every trained token of the step (not a mean of micro-batch means)."""
    student = AutoModelForCausalLM.from_pretrained(models["student"]).float()
    t_model = AutoModelForCausalLM.from_pretrained(models["teacher"]).float()
    shards, tok = shards_of(ctx.source(), models["student"], ctx.cache)
    rows = PackedRows(shards, ctx.config["seq_len"], pad_id=tok.pad_token_id)
    kd, ce, n = 0.0, 0.0, 0
    tau = spec.temperature
    for indices in step_rows:
        b = rows.batch(indices)
        with torch.no_grad():
            z = student(input_ids=b.input_ids, position_ids=b.position_ids).logits.double()
            t = t_model(input_ids=b.input_ids, position_ids=b.position_ids).logits.double()
        keep = b.labels != IGNORE_INDEX
        z, t, y = z[keep], t[keep], b.labels[keep]
        log_p, log_q = torch.log_softmax(t / tau, -1), torch.log_softmax(z / tau, -1)
        kd += float(tau * tau * (log_p.exp() * (log_p - log_q)).sum())
        ce += float(-torch.log_softmax(z, -1).gather(-1, y[:, None]).sum())
        n += int(keep.sum())
    return kd / n, ce / n


def test_kd_loss_of_the_first_step_equals_the_formula_and_the_model_keeps_its_template(models, chats, tmp_path):
    st = sft_stage(steps=2, loss={"teacher": True, "ce_weight": 0.25, "temperature": 2.0})
    ctx = context(tmp_path, st, {"student": models["student"], "teacher": models["teacher"]}, chats,
                  tmp_path / "cache")
    result = sft.run(ctx)
    first = records(ctx.out)[0]

    shards, tok = shards_of(chats, models["student"], ctx.cache)
    rows = PackedRows(shards, 96, pad_id=tok.pad_token_id)
    order = RowOrder(rows.rows, 8, seed=0, shuffle=True)
    kd, ce = _formula(models, ctx, LossSpec(temperature=2.0), [[order(0), order(1)], [order(2), order(3)]])
    assert first["kd"] == pytest.approx(kd, rel=1e-5) and first["ce"] == pytest.approx(ce, rel=1e-5)
    assert first["loss"] == pytest.approx(0.75 * kd + 0.25 * ce, rel=1e-5)
    assert 0 < first["trained_share"] < 0.5 and first["epoch"] == pytest.approx(order.epochs(4))
    assert result["teacher"] == "online" and result["chat_template"] == "default (written)"
    assert result["examples"] == 40 and result["epochs"] == pytest.approx(8 / min(rows.rows, 8))
    assert result["trained_tokens"] == sum(r["trained_tokens"] for r in records(ctx.out))

    saved = ctx.out / "model"
    assert AutoTokenizer.from_pretrained(saved).chat_template == chat.DEFAULT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    start = load_file(str(models["student"] / "model.safetensors"))
    assert any(not torch.equal(start[k], v) for k, v in weights(ctx.out).items())


def test_cached_logits_over_packed_rows_at_full_vocab_equal_the_online_teacher(models, chats, tmp_path):
    """The teacher-logits stage over a chat source caches exactly the rows sft reads: with k = vocab
    the cached run is the online run."""
    st = sft_stage(loss={"teacher": True, "top_k": 320, "temperature": 1.0})
    online = context(tmp_path / "online", sft_stage(loss={"teacher": True}), {
        "student": models["student"], "teacher": models["teacher"]}, chats, tmp_path / "cache")
    sft.run(online)
    cache_stage = {"id": "teacher-logits/teacher/chat", "kind": "teacher-logits", "config": {
        "seq_len": 96, "tokens": st["config"]["tokens"] * 2, "data": {"name": "chat", "offset": 0}, "top_k": 320,
        "micro_batch": 2, "precision": "fp32", "temperatures": [1.0]}}
    built = context(tmp_path / "cache-stage", cache_stage, {"teacher": models["teacher"]}, chats, tmp_path / "cache")
    info = teacher_logits.run(built)
    shards, _ = shards_of(chats, models["student"], tmp_path / "cache")
    assert info["sequences"] == PackedRows(shards, 96, pad_id=0).rows  # the data is smaller than the budget

    cached = context(tmp_path / "cached", st, {"student": models["student"], "teacher_logits": built.out}, chats,
                     tmp_path / "cache")
    assert sft.run(cached)["teacher"] == "cached"
    assert [r["loss"] for r in records(cached.out)] == pytest.approx([r["loss"] for r in records(online.out)],
                                                                     rel=1e-5)
    a, b = weights(online.out), weights(cached.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)

    other = {**chats, "system": "Be verbose."}  # other rows: the digest refuses the cache
    with pytest.raises(ValueError, match=r"were built on other tokens than this stage reads \(sha256 of the input "
                                         r"ids of packed rows \[0, \d+\) of 96 tokens: cache \w{12}, this stage \w{12}\)"):
        sft.run(context(tmp_path / "other", st, {"student": models["student"], "teacher_logits": built.out}, other,
                        tmp_path / "cache"))


def test_a_bf16_student_trains_and_saves_bf16_with_its_tied_head(models, chats, tmp_path):
    import shutil

    student = to_bf16(Path(shutil.copytree(models["student"], tmp_path / "bf16")))
    ctx = context(tmp_path / "run", sft_stage(steps=2, precision="bf16"), {"student": student}, chats,
                  tmp_path / "cache")
    result = sft.run(ctx)
    assert result["dtype"] == "bfloat16" and all(np.isfinite(r["loss"]) for r in records(ctx.out))
    assert {v.dtype for v in weights(ctx.out).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(ctx.out / "model").config.tie_word_embeddings


def test_a_mix_is_refused_with_the_fix(models, chats, tmp_path):
    st = sft_stage()
    st["config"]["data"] = {"name": "chat", "sources": {"a": {"offset": 0, "tokens": 1}}, "mix": {"a": 1}}
    with pytest.raises(ValueError, match=r"reads a mix; sft packs the conversations of one chat source"):
        sft.run(context(tmp_path, st, {"student": models["student"]}, chats, tmp_path / "cache"))


def test_plain_text_shards_are_refused(models, tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    source = {"kind": "jsonl", "paths": [str(tmp_path / "t.jsonl")], "name": "chat"}
    with pytest.raises(ValueError, match=r"holds plain text shards; sft packs conversations, so its data must be a "
                                         r"chat source \(`format: chat`\)"):
        sft.run(context(tmp_path, sft_stage(), {"student": models["student"]}, source, tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------
# `cascadec run` on a written spec; kill -9 and resume; two processes


SPEC = """cascadec: 1
family: sftfam
models:
  parent:
    source: {path: parent}
data:
  web: {kind: jsonl, paths: ["data/web.jsonl"]}
  chat: {kind: jsonl, paths: ["data/chat.jsonl"], format: chat, system: "Be brief."}
defaults:
  calibration: {data: web, samples: 2, seq_len: 16}
  batch: {global: 4, micro: 2}
children:
  - name: small
    prune_from: parent
    shape: {ffn: 64}
    phases:
      - {name: short, teacher: parent, data: web, tokens: 256, seq_len: 16}
    variants:
      instruct:
        - {name: sft, kind: sft, from: short, teacher: parent, data: chat, tokens: 4608, seq_len: 96, loss: {top_k: 8}}
      reasoning:
        - {name: sft, kind: sft, from: short, data: chat, tokens: 1152, seq_len: 96}
"""


@pytest.mark.slow
def test_cascadec_run_plans_and_runs_sft_with_one_teacher_pass_and_writes_loadable_models(models, tmp_path, capsys,
                                                                                          monkeypatch):
    import shutil

    from cascadec import cli

    shutil.copytree(models["teacher"], tmp_path / "parent")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/web.jsonl").write_text("".join(json.dumps({"text": f"{i}: def f(x): return x * {i}"}) + "\n"
                                                     for i in range(40)))
    (tmp_path / "data/chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations()))
    spec = SPEC.replace("tokens: 1152, seq_len: 96}", "tokens: 1152, seq_len: 96, loss: {top_k: 8}, teacher: parent}")
    (tmp_path / "spec.yaml").write_text(spec)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", "spec.yaml", "-o", "plan.json"]) == 0
    plan = {s["id"]: s for s in json.loads((tmp_path / "plan.json").read_text())["stages"]}
    cache = plan["teacher-logits/parent/chat"]
    assert cache["config"]["users"] == ["small/instruct/sft", "small/reasoning/sft"]
    for sid in ("sft/small/instruct/sft", "sft/small/reasoning/sft"):
        roles = {i["role"]: i.get("stage") for i in plan[sid]["inputs"]}
        assert roles == {"student": "distill/small/short", "tokens": "tokenize/chat/parent",
                         "teacher_logits": "teacher-logits/parent/chat"}
    capsys.readouterr()
    assert cli.main(["run", "spec.yaml", "--workdir", "ws"]) == 0
    out = capsys.readouterr().out
    assert "run   teacher-logits/parent/chat" in out and out.count("run   tokenize/chat/parent") == 1
    for sid in ("sft/small/instruct/sft", "sft/small/reasoning/sft"):
        folder = tmp_path / "ws" / "stages" / sid
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["metrics"]["teacher"] == "cached" and manifest["metrics"]["examples"] == 40
        assert AutoTokenizer.from_pretrained(folder / "model").chat_template == chat.DEFAULT_TEMPLATE
        AutoModelForCausalLM.from_pretrained(folder / "model")
    instruct = json.loads((tmp_path / "ws/stages/sft/small/instruct/sft/manifest.json").read_text())["metrics"]
    assert instruct["rows_used"] == instruct["rows"] < 48  # 48 rows read of a smaller data set: it repeats
    assert instruct["epochs"] == pytest.approx(48 / instruct["rows"])


@pytest.mark.slow
def test_sigkill_mid_sft_then_resume_gives_bit_identical_weights(models, chats, tmp_path):
    st = sft_stage(steps=60, checkpoint={"every_steps": 5, "keep": 2}, loss={"teacher": True, "ce_weight": 0.5})
    inputs = {"student": models["student"], "teacher": models["teacher"]}
    reference = context(tmp_path / "ref", st, inputs, chats, tmp_path / "cache")
    sft.run(reference)

    ctx_json = _ctx_json(tmp_path / "run", st, inputs, chats, tmp_path / "cache")
    raw = json.loads(ctx_json.read_text())
    ctx_json.write_text(json.dumps({**raw, "data": {"chat": chats}}))
    metrics = tmp_path / "run" / "scratch" / "metrics.jsonl"
    # killed once step 7 is logged: after the checkpoint of step 5, before that of step 10
    killed_at, result = kill_then_resume(ctx_json, lambda: metrics.exists() and metrics.read_text().count("\n") >= 7)
    assert result["resumed_from_step"] == killed_at == 5
    a, b = weights(reference.out), weights(tmp_path / "run" / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(reference.out) == [{**r, "tokens_per_s": x["tokens_per_s"]}
                                      for r, x in zip(records(tmp_path / "run" / "out"), records(reference.out))]
    assert result["trained_tokens"] == sum(r["trained_tokens"] for r in records(reference.out))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(models, chats, tmp_path, strategy):
    """Global batch 4: one process accumulates 4 micro-batches, two processes 2 each (DDP, or FSDP2
    sharding student and teacher). The loss is the mean over the step's trained tokens however they
    are split, so the runs agree to the summation order of the gradient reduction."""
    st = sft_stage(micro_batch=1, loss={"teacher": True, "ce_weight": 0.5})
    inputs = {"student": models["student"], "teacher": models["teacher"]}
    one = context(tmp_path / "one", st, inputs, chats, tmp_path / "cache")
    sft.run(one)
    two_stage = {**st, "launch": {"devices": 2, "nodes": 1, "launcher": "accelerate", "strategy": strategy}}
    two = context(tmp_path / "two", two_stage, inputs, chats, tmp_path / "cache")
    two.scratch.mkdir(parents=True)
    lines = []
    two.log = lines.append
    result = executor._spawn(two)
    assert (result["processes"], result["strategy"]) == (2, strategy), "\n".join(lines[-40:])
    for a, b in zip(records(one.out), records(two.out)):
        for key in ("loss", "kd", "ce", "trained_tokens", "trained_share", "epoch"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    a, b = weights(one.out), weights(two.out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(two.out / "model").chat_template == chat.DEFAULT_TEMPLATE
