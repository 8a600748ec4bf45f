"""Token streams: exact counts, deterministic sharding, the content-addressed cache, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from cascadec.runtime.data import stream as D


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["student"])


def _stream(corpus, tok, tiny_models, cache, need=100):
    return D.open_stream(corpus, tok, tiny_models["student"], cache, need, log=lambda m: None)


def test_stream_is_documents_each_followed_by_eos(corpus, tok, tiny_models, tmp_path):
    stream = _stream(corpus, tok, tiny_models, tmp_path)
    path = D.source_files(corpus)[0][1]
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    expected = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(stream) == len(expected)
    assert stream.read(0, len(expected)).tolist() == expected
    assert stream.read(5, 9).tolist() == expected[5:9]


def test_window_reads_exactly_steps_x_seq_len_x_global_batch_tokens_from_offset(corpus, tok, tiny_models, tmp_path):
    stream = _stream(corpus, tok, tiny_models, tmp_path)
    window = D.Window(seq_len=8, global_batch=6, steps=3, offset=11)
    assert window.tokens == 144
    seen = [b for step in range(window.steps) for b, _ in D.micro_batches(stream, window, step, 0, 1, 2)]
    flat = torch.cat([b.reshape(-1) for b in seen])
    assert flat.numel() == window.tokens
    assert torch.equal(flat, stream.read(11, 11 + 144))


def test_sharding_splits_each_global_batch_between_processes(corpus, tok, tiny_models, tmp_path):
    stream = _stream(corpus, tok, tiny_models, tmp_path)
    window = D.Window(seq_len=8, global_batch=4, steps=2, offset=0)
    one = [i for _, ix in D.micro_batches(stream, window, 1, 0, 1, 2) for i in ix]
    two = [[i for _, ix in D.micro_batches(stream, window, 1, rank, 2, 1) for i in ix] for rank in (0, 1)]
    assert one == two[0] + two[1] == [4, 5, 6, 7]
    again = [i for _, ix in D.micro_batches(stream, window, 1, 1, 2, 1) for i in ix]
    assert again == two[1]
    with pytest.raises(ValueError, match="not a multiple of micro_batch 3 × 2 processes"):
        list(D.micro_batches(stream, window, 0, 0, 2, 3))


def test_shuffled_window_visits_every_sequence_once_in_a_scattered_order(corpus, tok, tiny_models, tmp_path):
    stream = _stream(corpus, tok, tiny_models, tmp_path)
    plain = D.Window(seq_len=4, global_batch=6, steps=5, offset=3)
    mixed = D.Window(seq_len=4, global_batch=6, steps=5, offset=3, shuffle=True)

    def order(window):
        return [i for step in range(window.steps) for _, ix in D.micro_batches(stream, window, step, 0, 1, 2) for i in ix]

    assert order(plain) == list(range(30))
    visited = order(mixed)
    assert sorted(visited) == list(range(30)) and visited != list(range(30))  # same tokens, other order
    first_step = visited[:6]
    assert max(first_step) - min(first_step) > 6  # one step is not six neighbours
    assert order(mixed) == visited  # deterministic (resume and every process agree)
    assert D.Window.from_config({"seq_len": 4, "global_batch": 6, "steps": 5,
                                 "data": {"name": "x", "offset": 3, "shuffle": True}}) == mixed


def test_second_tokenisation_hits_the_cache(corpus, tok, tiny_models, tmp_path, monkeypatch):
    from cascadec.runtime.data import shards

    first = _stream(corpus, tok, tiny_models, tmp_path)
    calls = []
    monkeypatch.setattr(shards, "documents", lambda *a, **k: calls.append(a) or iter(()))
    second = _stream(corpus, tok, tiny_models, tmp_path)
    assert calls == [] and second.shards.folder == first.shards.folder
    assert sorted(p.name for p in tmp_path.rglob("*.bin")) == ["000000.bin", "000000.docs.bin"]


def test_an_edited_file_is_tokenised_again(corpus, tok, tiny_models, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(D.source_files(corpus)[0][1].read_text())
    source = {**corpus, "paths": [str(path)]}
    before = len(_stream(source, tok, tiny_models, tmp_path / "c"))
    path.write_text(path.read_text() + json.dumps({"text": "one more"}) + "\n")
    after = _stream(source, tok, tiny_models, tmp_path / "c")
    extra = tok("one more", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(after) == before + len(extra) and after.read(before, len(after)).tolist() == extra


def test_too_short_source_says_how_many_tokens_it_has_and_needs(corpus, tok, tiny_models, tmp_path):
    have = len(_stream(corpus, tok, tiny_models, tmp_path))
    with pytest.raises(ValueError, match=rf"has {have:,} tokens .* needs {have + 1:,}"):
        _stream(corpus, tok, tiny_models, tmp_path, need=have + 1)


def test_stdlib_builtin_is_hash_ordered_and_split_by_file():
    import hashlib

    train = D.source_files({"kind": "builtin", "builtin": "stdlib"})
    heldout = D.source_files({"kind": "builtin", "builtin": "stdlib", "split": "heldout"})
    names = [n for n, _ in train]
    assert names == sorted(names, key=lambda n: hashlib.sha256(n.encode()).digest()) and len(names) > 200
    assert names != sorted(names)  # scattered: a window is a sample of modules, not one package
    assert heldout and not set(names) & {n for n, _ in heldout}
    assert all("site-packages" not in n for n in names)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="data kind 'csv' is not readable"):
        D.source_files({"kind": "csv", "paths": []})
