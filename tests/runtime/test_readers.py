"""Readers: every kind and format read from files the tests write; every bad input gets its exact,
located error; skips are counted. Torch-free (readers.py must stay so)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cascadec.runtime.data import readers as R
from cascadec.runtime.data.readers import DataError, Skips

DOCS = ["first document", "second, with ünïcode", "third\nof two lines"]


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def read_all(source) -> list:
    return [d for _, path in R.source_files(source) for d in R.documents(path, source)]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # errors name files relative to the working directory


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("suffix, pack", [
    ("", lambda b: b),
    (".gz", gzip.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_jsonl_plain_gzip_and_zstd_read_the_same_documents(tmp_path, suffix, pack):
    (tmp_path / f"a.jsonl{suffix}").write_bytes(pack(jsonl_bytes([{"text": d, "id": i} for i, d in enumerate(DOCS)])))
    assert read_all({"kind": "jsonl", "paths": [f"*.jsonl{suffix}"]}) == DOCS


def test_zstd_of_concatenated_frames_is_read_whole(tmp_path):
    z = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(z.compress(jsonl_bytes([{"text": DOCS[0]}])) + z.compress(jsonl_bytes([{"text": DOCS[1]}])))
    assert read_all({"kind": "jsonl", "paths": ["a.jsonl.zst"]}) == DOCS[:2]


def test_text_files_are_one_document_each_in_sorted_order(tmp_path):
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(DOCS[1].encode()))
    (tmp_path / "a.txt").write_text(DOCS[0])
    assert read_all({"kind": "text", "paths": ["*.txt*"]}) == DOCS[:2]


def test_jsonl_field_is_chosen_by_the_source(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes([{"body": d, "text": "no"} for d in DOCS]))
    assert read_all({"kind": "jsonl", "paths": ["a.jsonl"], "field": "body"}) == DOCS


def test_parquet_column_is_read_in_row_group_batches(tmp_path, monkeypatch):
    from cascadec.runtime.data import formats

    monkeypatch.setattr(formats, "ROWS", 2)  # batches smaller than a row group and the file
    texts = [f"doc {i}" for i in range(7)]
    pq.write_table(pa.table({"id": list(range(7)), "content": texts}), tmp_path / "a.parquet", row_group_size=3)
    batches = []
    real = pq.ParquetFile.iter_batches

    def spy(self, **kw):
        batches.append(kw)
        return real(self, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert read_all({"kind": "parquet", "paths": ["*.parquet"], "field": "content"}) == texts
    assert batches == [{"batch_size": 2, "columns": ["content"]}]  # only the needed column is read


def test_save_to_disk_dataset_is_its_arrow_shards_in_saved_order(tmp_path):
    import datasets

    texts = [f"row {i}" for i in range(10)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(10))}).save_to_disk(tmp_path / "ds", num_shards=3)
    source = {"kind": "dataset", "paths": ["ds"]}
    units = R.source_files(source)
    assert [p.name for _, p in units] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert read_all(source) == texts


def test_save_to_disk_dataset_dict_reads_the_chosen_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t0", "t1"]}),
                               "test": datasets.Dataset.from_dict({"text": ["e0"]})})
    dd.save_to_disk(tmp_path / "dd")
    assert read_all({"kind": "dataset", "paths": ["dd"], "split": "test"}) == ["e0"]
    with pytest.raises(DataError) as e:
        R.source_files({"kind": "dataset", "paths": ["dd"], "name": "sft"})
    assert str(e.value) == "dd: a DatasetDict with splits train, test; choose one: set data.sft.split"
    with pytest.raises(DataError) as e:
        R.source_files({"kind": "dataset", "paths": ["dd"], "split": "dev", "name": "sft"})
    assert str(e.value) == "dd: a DatasetDict with splits train, test; it has no split 'dev': set data.sft.split"


def _hub_cache(root, files: dict, readme: str | None = None, ref="main", sha="c0ffee" + "0" * 34):
    """A Hugging Face hub cache holding dataset acme/tiny at commit ``sha`` (laid out as `hf download` does)."""
    repo = root / "datasets--acme--tiny"
    snap = repo / "snapshots" / sha
    for rel, table in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, snap / rel)
    if readme:
        (snap / "README.md").write_text(readme)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / ref).write_text(sha)
    return root


def test_hub_dataset_is_read_offline_from_the_local_cache(tmp_path, monkeypatch):
    cache = _hub_cache(tmp_path / "hub", {
        "data/train-00000-of-00002.parquet": pa.table({"text": ["a", "b"]}),
        "data/train-00001-of-00002.parquet": pa.table({"text": ["c"]}),
        "data/validation-00000-of-00001.parquet": pa.table({"text": ["v"]}),
    })
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    source = {"kind": "dataset", "hub": "acme/tiny", "revision": "main", "name": "web"}
    assert [p.name for _, p in R.source_files(source)] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert read_all(source) == ["a", "b", "c"]
    assert read_all({**source, "split": "validation"}) == ["v"]
    with pytest.raises(DataError) as e:
        R.source_files({**source, "split": "test"})
    assert str(e.value) == "hub dataset acme/tiny: no split 'test' (splits: train, validation); set data.web.split"
    with pytest.raises(DataError) as e:
        R.source_files({**source, "revision": "v2"})
    assert str(e.value) == (f"hub dataset acme/tiny at revision v2 is not in the local Hugging Face cache ({cache}) "
                            "and HF_HUB_OFFLINE is set; fetch it where there is network: "
                            "`hf download acme/tiny --repo-type dataset --revision v2`")


def test_hub_dataset_subset_follows_the_readme_configs(tmp_path, monkeypatch):
    readme = ("---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n    path: small/*.parquet\n"
              "- config_name: big\n  data_files:\n  - split: train\n    path: big/*.parquet\n---\n")
    cache = _hub_cache(tmp_path / "hub", {"small/0.parquet": pa.table({"text": ["s"]}),
                                          "big/0.parquet": pa.table({"text": ["b1", "b2"]})}, readme)
    for k, v in {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "HF_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(k, v)
    assert read_all({"kind": "dataset", "hub": "acme/tiny", "subset": "big"}) == ["b1", "b2"]
    assert read_all({"kind": "dataset", "hub": "acme/tiny", "subset": "small"}) == ["s"]


def test_tokenized_files_yield_documents_of_ids(tmp_path):
    from safetensors.numpy import save_file

    save_file({"tokens": np.array([5, 6, 7, 8, 9, 10], dtype=np.uint16),
               "doc_ends": np.array([2, 5, 6], dtype=np.int64)}, str(tmp_path / "a.safetensors"))
    np.save(tmp_path / "b.npy", np.array([70000, 1], dtype=np.uint32))
    source = {"kind": "tokenized", "paths": ["*.safetensors", "*.npy"]}
    docs = [d.tolist() for _, p in R.source_files(source) for d in R.token_documents(p, source)]
    assert docs == [[5, 6], [7, 8, 9], [10], [70000, 1]]
    with pytest.raises(ValueError, match="a tokenized source holds token ids, not text"):
        next(R.documents(tmp_path / "b.npy", source))


def test_tokenized_file_of_floats_is_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(DataError) as e:
        list(R.token_documents(tmp_path / "f.npy", {"kind": "tokenized"}))
    assert str(e.value) == "f.npy: tokens are float32 of shape (3,); expected a 1-D array of uint16, uint32, int32, int64"


def test_builtin_stdlib_documents_are_python_source():
    source = {"kind": "builtin", "builtin": "stdlib"}
    name, path = R.source_files(source)[0]
    assert next(R.documents(path, source)) == path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Bad data: one located error each


def bad(tmp_path, name: str, content: bytes, **source) -> str:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        read_all({"kind": "jsonl", "paths": [name], "name": "web", **source})
    return str(e.value)


def test_missing_field_names_file_line_fields_and_the_fix(tmp_path):
    records = [{"text": "ok"}] * 16 + [{"body": "x", "id": 17}]
    assert bad(tmp_path, "x.jsonl", jsonl_bytes(records)) == \
        "x.jsonl:17: no field 'text' (fields: body, id); set data.web.field"


def test_record_that_is_not_an_object(tmp_path):
    assert bad(tmp_path, "x.jsonl", b'{"text": "a"}\n\n["a", "list"]\n') == \
        'x.jsonl:3: record is a JSON array, not an object; each line must be an object such as {"text": ...}'


def test_invalid_json_and_non_string_field(tmp_path):
    assert bad(tmp_path, "x.jsonl", b'{"text": "a"\n') == "x.jsonl:1: not valid JSON (Expecting ',' delimiter at column 13)"
    assert bad(tmp_path, "y.jsonl", b'{"text": null}\n') == "y.jsonl:1: field 'text' is null, not a string"


def test_non_utf8_bytes_give_line_and_column(tmp_path):
    assert bad(tmp_path, "x.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n') == \
        "x.jsonl:2: not UTF-8 (byte 0xe9 at column 14); convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    (tmp_path / "t.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(DataError) as e:
        read_all({"kind": "text", "paths": ["t.txt"]})
    assert str(e.value) == "t.txt: not UTF-8 (byte 0xff at line 2, column 6); convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"


def test_empty_files(tmp_path):
    assert bad(tmp_path, "x.jsonl", b"\n\n") == "x.jsonl: empty file (no records); remove it from data.web.paths"
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DataError) as e:
        read_all({"kind": "text", "paths": ["e.txt"], "name": "web"})
    assert str(e.value) == "e.txt: empty file; remove it from data.web.paths"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(DataError) as e:
        read_all({"kind": "parquet", "paths": ["e.parquet"], "name": "web"})
    assert str(e.value) == "e.parquet: no rows; remove it from data.web.paths"


def test_truncated_gzip_and_zstd(tmp_path):
    data = jsonl_bytes([{"text": f"document {i} " * 20} for i in range(500)])
    g = gzip.compress(data)
    assert bad(tmp_path, "x.jsonl.gz", g[: len(g) // 2]) == \
        "x.jsonl.gz: truncated gzip file (it ends before the end-of-stream marker); copy or download it again"
    z = zstandard.ZstdCompressor().compress(data)
    assert bad(tmp_path, "x.jsonl.zst", z[: len(z) // 2]) == \
        "x.jsonl.zst: truncated zstd file (its last frame is incomplete); copy or download it again"


def test_parquet_without_the_column_lists_the_columns(tmp_path):
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), tmp_path / "p.parquet")
    with pytest.raises(DataError) as e:
        read_all({"kind": "parquet", "paths": ["p.parquet"], "name": "web"})
    assert str(e.value) == "p.parquet: no column 'text' (columns: body, id); set data.web.field"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError) as e:
        read_all({"kind": "parquet", "paths": ["n.parquet"]})
    assert str(e.value) == "n.parquet: row 1: field 'text' is null, not a string"


# ---------------------------------------------------------------------------------------------
# on_error: skip counts what it skips


def test_skip_counts_every_bad_record_and_keeps_the_good_ones(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "a"}\n{"body": "b"}\n[1]\n{"text": "caf\xe9"}\n{"text": "d"}\n')
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "e"}\n')
    skips = Skips()
    source = {"kind": "jsonl", "paths": ["*.jsonl"], "on_error": "skip", "name": "web"}
    docs = [d for _, p in R.source_files(source) for d in R.documents(p, source, skips)]
    assert docs == ["a", "d", "e"]
    assert skips.manifest() == {"skipped": 3, "per_file": {"a.jsonl": 3}, "first": [
        "a.jsonl:2: no field 'text' (fields: body); set data.web.field",
        'a.jsonl:3: record is a JSON array, not an object; each line must be an object such as {"text": ...}',
        "a.jsonl:4: not UTF-8 (byte 0xe9 at column 14); convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
    ]}


def test_skip_counts_a_truncated_file_once_after_its_readable_records(tmp_path, monkeypatch):
    from cascadec.runtime.data import formats

    monkeypatch.setattr(formats, "CHUNK", 4096)  # records decoded before the cut are yielded
    data = jsonl_bytes([{"text": f"document {i} " * 20} for i in range(500)])
    g = gzip.compress(data)
    (tmp_path / "x.jsonl.gz").write_bytes(g[: len(g) // 2])
    skips = Skips()
    docs = list(R.documents(tmp_path / "x.jsonl.gz", {"kind": "jsonl", "on_error": "skip"}, skips))
    assert 0 < len(docs) < 500 and docs == [f"document {i} " * 20 for i in range(len(docs))]
    assert skips.per_file == {"x.jsonl.gz": 1} and "truncated gzip file" in skips.first[0]


def test_skip_without_a_counter_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "a"}\n')
    with pytest.raises(ValueError, match="on_error: skip needs a Skips counter"):
        list(R.documents(tmp_path / "a.jsonl", {"kind": "jsonl", "on_error": "skip"}))


def test_readers_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from cascadec.runtime.data import readers, formats, hf; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


SPEC = """cascadec: 1
family: baddata
models:
  parent:
    source: {path: parent}
data:
  web: {kind: jsonl, paths: ["data/*.jsonl"]}
defaults:
  calibration: {data: web, samples: 2, seq_len: 16}
children:
  - name: small
    prune_from: parent
    shape: {ffn: 64}
    phases:
      - {name: short, teacher: parent, data: web, tokens: 1M, seq_len: 16}
"""


def test_cascadec_run_reports_bad_data_as_one_located_error(tmp_path, tiny_models, capsys):
    import shutil

    from cascadec import cli

    shutil.copytree(tiny_models["teacher"], tmp_path / "parent")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/x.jsonl").write_text('{"text": "ok ok"}\n' * 16 + '{"body": "x", "id": 17}\n')
    (tmp_path / "spec.yaml").write_text(SPEC)
    assert cli.main(["run", "spec.yaml", "--workdir", "ws"]) == 1
    out, err = capsys.readouterr()
    lines = (out + err).splitlines()
    assert lines[0] == "run   calibrate/small      (new)"
    assert lines[-1] == ("error: stage calibrate/small failed: data/x.jsonl:17: no field 'text' "
                                    "(fields: body, id); set data.web.field "
                                    "(traceback in scratch/calibrate/small/traceback.txt)")
    assert "Traceback" not in out + err


def test_prune_calibration_file_is_read_by_its_name(tmp_path):
    from pathlib import Path

    from cascadec.runtime.surgery.calibration_text import file_source

    kinds = {n: file_source(Path(n))["kind"] for n in ("a.txt", "a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet")}
    assert kinds == {"a.txt": "text", "a.jsonl": "jsonl", "a.jsonl.gz": "jsonl", "a.jsonl.zst": "jsonl",
                     "a.parquet": "parquet"}
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes([{"text": d} for d in DOCS])))
    assert read_all(file_source(Path("c.jsonl.gz"))) == DOCS


def test_skipped_records_are_counted_in_the_stage_manifest(tmp_path, tiny_models, capsys):
    import shutil

    from cascadec import cli

    shutil.copytree(tiny_models["teacher"], tmp_path / "parent")
    (tmp_path / "data").mkdir()
    good = "".join(json.dumps({"text": f"document {i}: " + "words " * 20}) + "\n" for i in range(8))
    (tmp_path / "data/x.jsonl").write_text(good + '{"body": "x"}\n[3]\n')
    (tmp_path / "spec.yaml").write_text(SPEC.replace('paths: ["data/*.jsonl"]}', 'paths: ["data/*.jsonl"], on_error: skip}'))
    assert cli.main(["run", "spec.yaml", "--workdir", "ws", "--only", "calibrate/small"]) == 0
    manifest = json.loads((tmp_path / "ws/stages/calibrate/small/manifest.json").read_text())
    assert manifest["metrics"]["data_skipped"] == {"skipped": 2, "per_file": {"data/x.jsonl": 2}, "first": [
        "data/x.jsonl:9: no field 'text' (fields: body); set data.web.field",
        'data/x.jsonl:10: record is a JSON array, not an object; each line must be an object such as {"text": ...}',
    ]}
