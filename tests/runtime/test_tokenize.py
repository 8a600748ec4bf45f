"""The tokenize stage and its shards: 1 and 2 processes write the same bytes from disjoint files,
a killed run resumes per file and reads the same tokens, reads by offset cross files exactly,
and a stage reading shards of another tokenizer is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from cascadec import workspace as ws
from cascadec.runtime import executor
from cascadec.runtime.data import shards
from cascadec.runtime.data.stream import TokenStream, Window, micro_batches, stage_stream

SID = "tokenize/corpus/student"


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["student"])


def _corpus(root: Path, files: int = 5) -> list[list[str]]:
    """``files`` jsonl files of a few documents each (sizes differ, one file is empty of text)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(files):
        docs = [f"file {f} doc {d}: " + "def f(x):\n    return x * %d\n" % (f + d) * (1 + (f * 3 + d) % 4)
                for d in range(2 + f % 3)]
        (root / "data" / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        texts.append(docs)
    return texts


def _plan(tiny_models, devices: int = 1) -> dict:
    launch = {"devices": devices, "nodes": 1, "launcher": "local" if devices == 1 else "accelerate", "strategy": "none"}
    stage = {"id": SID, "kind": "tokenize", "hash": f"h{devices}", "needs": [],
             "inputs": [{"role": "tokenizer", "model": "student"}, {"role": "data", "data": "corpus"}],
             "outputs": [f"stages/{SID}/tokens"], "config": {"data": {"name": "corpus"}}, "launch": launch}
    return {"spec_sha256": "0" * 64, "models": {"student": {"source": {"path": str(tiny_models["student"])}}},
            "data": {"corpus": {"kind": "jsonl", "paths": ["data/*.jsonl"], "field": "text"}}, "stages": [stage]}


def _run(plan, work, base):
    lines = []
    rc = executor.run_plan(plan, work, base, out=lines.append)
    assert rc == 0, "\n".join(lines)
    return lines


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_stream_is_every_document_then_eos_in_file_order_and_reads_cross_files(tiny_models, tok, tmp_path):
    texts = _corpus(tmp_path)
    _run(_plan(tiny_models), tmp_path / "work", tmp_path)
    out = tmp_path / "work" / "stages" / SID / "tokens"
    expected = [[i for t in docs for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
                for docs in texts]
    stream = TokenStream(out)
    flat = [i for part in expected for i in part]
    assert len(stream) == len(flat) and stream.read(0, len(flat)).tolist() == flat
    assert stream.index["dtype"] == "uint16" and (out / "000000.bin").stat().st_size == 2 * len(expected[0])
    lo, hi = len(expected[0]) - 3, len(expected[0]) + len(expected[1]) + 4  # spans three files
    assert stream.read(lo, hi).tolist() == flat[lo:hi]
    ends = np.fromfile(out / "000002.docs.bin", dtype="<i8").tolist()  # document boundaries
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts[2]]
    assert ends == np.cumsum(lengths).tolist()
    manifest = ws.read_manifest(tmp_path / "work", SID)
    assert manifest["metrics"]["file_tokens"] == {
        str((tmp_path / f"data/part-{f}.jsonl").resolve()): len(e) for f, e in enumerate(expected)}
    assert manifest["metrics"]["tokens"] == len(flat)
    with pytest.raises(IndexError, match=rf"stream has {len(flat):,} tokens; asked for \[0, {len(flat) + 1:,}\)"):
        stream.read(0, len(flat) + 1)


@pytest.mark.slow
def test_two_processes_tokenise_disjoint_files_into_the_same_shards_as_one(tiny_models, tmp_path):
    _corpus(tmp_path, files=5)
    _run(_plan(tiny_models, 1), tmp_path / "one", tmp_path)
    _run(_plan(tiny_models, 2), tmp_path / "two", tmp_path)
    one, two = (tmp_path / w / "stages" / SID / "tokens" for w in ("one", "two"))
    assert _files(one) == _files(two)
    assert ws.read_manifest(tmp_path / "one", SID)["metrics"]["files_per_rank"] == {"0": 5}
    assert ws.read_manifest(tmp_path / "two", SID)["metrics"]["files_per_rank"] == {"0": 3, "1": 2}  # 0,2,4 | 1,3


def test_a_killed_run_resumes_per_file_and_reads_the_same_tokens(tiny_models, monkeypatch, tmp_path):
    _corpus(tmp_path)
    _run(_plan(tiny_models), tmp_path / "clean", tmp_path)
    real, done = shards.tokenize_file, []

    def dies_on_the_third(*args, **kw):
        if len(done) == 2:
            raise KeyboardInterrupt  # as a kill: the third file's shard is never renamed into place
        done.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(shards, "tokenize_file", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        executor.run_plan(_plan(tiny_models), tmp_path / "work", tmp_path, out=lambda line: None)
    assert ws.evaluate(_plan(tiny_models)["stages"][0], tmp_path / "work").why == "interrupted"
    monkeypatch.setattr(shards, "tokenize_file", lambda *a, **k: done.append(a[1]) or real(*a, **k))
    lines = _run(_plan(tiny_models), tmp_path / "work", tmp_path)
    assert "      tokenize: rank 0: 2 of 5 files already tokenised (resumed)" in lines
    assert len(done) == 5  # 2 before the kill, the other 3 after it
    clean, resumed = (tmp_path / w / "stages" / SID / "tokens" for w in ("clean", "work"))
    assert _files(clean) == _files(resumed)
    a, b = TokenStream(clean), TokenStream(resumed)
    assert a.read(0, len(a)).tolist() == b.read(0, len(b)).tolist()


def test_an_edited_file_is_tokenised_again_even_with_its_old_shard_in_scratch(tiny_models, tok, tmp_path):
    _corpus(tmp_path, files=2)
    work = tmp_path / "scratch"
    files = [(str(p), p) for p in sorted((tmp_path / "data").glob("*.jsonl"))]
    source = {"kind": "jsonl", "field": "text"}
    first = shards.tokenize(files, source, tok, work, progress=False)
    files[1][1].write_text(json.dumps({"text": "replaced"}) + "\n")
    again = shards.tokenize(files, source, tok, work, progress=False, log=lambda m: None)
    assert again[0] == first[0] and again[1]["tokens"] == len(tok("replaced", add_special_tokens=False)["input_ids"]) + 1


def test_two_training_processes_read_disjoint_sequences_of_the_shards(tiny_models, tmp_path):
    _corpus(tmp_path)
    _run(_plan(tiny_models), tmp_path / "work", tmp_path)
    stream = TokenStream(tmp_path / "work" / "stages" / SID / "tokens")
    window = Window(seq_len=8, global_batch=4, steps=3, offset=5, shuffle=True)
    for step in range(window.steps):
        ranks = [list(micro_batches(stream, window, step, rank, 2, 1)) for rank in (0, 1)]
        seen = [[i for _, ix in r for i in ix] for r in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(window.visit(p) for p in range(step * 4, step * 4 + 4))
        for r in ranks:
            for ids, ix in r:
                assert ids[0].tolist() == stream.read(*window.sequence(ix[0])).tolist()


def test_a_stage_refuses_shards_of_another_tokenizer_or_too_few_tokens(tiny_models, tok, tmp_path):
    from tinymodels import save_model

    _corpus(tmp_path)
    _run(_plan(tiny_models), tmp_path / "work", tmp_path)
    folder = tmp_path / "work" / "stages" / SID / "tokens"
    other = save_model(tmp_path / "other", "mistral", seed=3, layers=1, hidden=32, ffn=64, heads=2, kv_heads=1)
    (other / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))

    class Ctx:
        config = {"data": {"name": "corpus", "offset": 0}}
        inputs = {"tokens": folder}

    with pytest.raises(ValueError, match="was tokenised with another tokenizer than"):
        stage_stream(Ctx(), tok, other, 10)
    have = len(TokenStream(folder))
    with pytest.raises(ValueError, match=rf"has {have:,} tokens \(5 files\) with this tokenizer; the stage needs {have + 1:,}"):
        stage_stream(Ctx(), tok, tiny_models["student"], have + 1)
    assert len(stage_stream(Ctx(), tok, tiny_models["student"], have)) == have


def _mix_sources(tiny_models, tmp_path) -> dict[str, Path]:
    """Two tokenised sources, `web` and `code`, each through the real tokenize stage."""
    folders = {}
    for name in ("web", "code"):
        root = tmp_path / name
        _corpus(root, files=4 if name == "web" else 3)
        _run(_plan(tiny_models), root / "work", root)
        folders[name] = root / "work" / "stages" / SID / "tokens"
    return folders


def _mix_config(steps: int, seq_len: int, batch: int, ends: dict) -> dict:
    """A stage's `config.data` as the compiler writes it for a streamed 70/30 mix."""
    from cascadec import mix

    weights = {"web": 0.7, "code": 0.3}
    sources = {}
    for name, n in mix.counts(weights, steps * batch).items():
        sources[name] = {"offset": ends[name], "sequences": n, "tokens": n * seq_len}
        ends[name] += n * seq_len
    return {"name": "blend", "offset": 0, "shuffle": True, "mix": weights, "sources": sources}


def test_a_70_30_mix_reads_exactly_each_stages_planned_tokens_of_each_source_once(tiny_models, tok, tmp_path):
    folders = _mix_sources(tiny_models, tmp_path)
    streams = {k: TokenStream(v) for k, v in folders.items()}
    ends, read = {"web": 0, "code": 0}, {"web": [], "code": []}
    for steps in (3, 2):  # two stages in plan order, one pass over each source
        data = _mix_config(steps, 8, 10, ends)

        class Ctx:
            config = {"data": data}
            inputs = {f"tokens:{k}": v for k, v in folders.items()}

        stream = stage_stream(Ctx(), tok, tiny_models["student"], 0)
        window = Window(seq_len=8, global_batch=10, steps=steps, shuffle=True)
        got = {"web": 0, "code": 0}
        for step in range(steps):
            for rank in (0, 1):
                for ids, ix in micro_batches(stream, window, step, rank, 2, 5):
                    for row, i in zip(ids, ix):
                        name = stream.source_of(i)
                        got[name] += len(row)
                        read[name].append(row.tolist())
        assert got == {k: v["tokens"] for k, v in data["sources"].items()}
        assert got["web"] * 3 == got["code"] * 7  # 70/30 exactly: 10 sequences a step
    for name, rows in read.items():  # the windows follow each other and nothing is read twice
        flat = streams[name].read(0, ends[name]).tolist()
        assert sorted(rows) == sorted(flat[i:i + 8] for i in range(0, ends[name], 8))


@pytest.mark.slow
def test_a_distill_stage_on_a_mix_records_its_per_source_tokens(tiny_models, tmp_path):
    from stagekit import context, stage

    from cascadec.runtime.stages import distill

    folders = _mix_sources(tiny_models, tmp_path)
    st = stage(steps=2, seq_len=8, global_batch=10, micro_batch=5)
    st["config"]["data"] = _mix_config(2, 8, 10, {"web": 0, "code": 0})
    inputs = {**tiny_models, **{f"tokens:{k}": v for k, v in folders.items()}}
    metrics = distill.run(context(tmp_path / "run", st, inputs, {}))
    assert metrics["source_tokens"] == {"code": 48, "web": 112}  # 6 and 14 sequences of 8
    from cascadec.runtime import report

    st.update(estimate={"tokens": 160, "device_hours": 0.0})
    (tmp_path / "ws" / "stages" / st["id"]).mkdir(parents=True)
    ws.atomic_write_json(tmp_path / "ws" / "stages" / st["id"] / "manifest.json", {"metrics": metrics})
    plan = {"family": "f", "spec_sha256": "0" * 64, "models": {}, "stages": [st], "totals": {}}
    assert report.collect(plan, tmp_path / "ws")["mixes"] == [{"stage": st["id"], "data": "blend", "sources": {
        "code": {"planned": 48, "offset": 0, "read": 48}, "web": {"planned": 112, "offset": 0, "read": 112}}}]


def test_pre_tokenised_files_and_skipped_records_go_through_the_same_stage(tiny_models, tok, tmp_path):
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "a.npy", np.array([5, 6, 7, 300], dtype=np.int32))
    np.save(tmp_path / "data" / "b.npy", np.array([9], dtype=np.int64))
    plan = _plan(tiny_models)
    plan["data"]["corpus"] = {"kind": "tokenized", "paths": ["data/*.npy"]}
    _run(plan, tmp_path / "work", tmp_path)
    eos = tok.eos_token_id
    stream = TokenStream(tmp_path / "work" / "stages" / SID / "tokens")
    assert stream.read(0, len(stream)).tolist() == [5, 6, 7, 300, eos, 9, eos]

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.jsonl").write_text('{"text": "kept"}\n["not an object"]\n{"text": "also kept"}\n')
    plan = _plan(tiny_models)
    plan["data"]["corpus"] = {"kind": "jsonl", "paths": ["text/*.jsonl"], "field": "text", "on_error": "skip"}
    _run(plan, tmp_path / "work2", tmp_path)
    skipped = ws.read_manifest(tmp_path / "work2", SID)["metrics"]["skipped"]
    assert skipped["skipped"] == 1 and list(skipped["per_file"].values()) == [1]
    assert ":2" in skipped["first"][0]  # the record is named by its line
    stream = TokenStream(tmp_path / "work2" / "stages" / SID / "tokens")
    assert stream.index["files"][0]["documents"] == 2
