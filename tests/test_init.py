"""`cascadec init NAME [--from EXAMPLE] [-o PATH]`: every named example starts a spec that compiles,
the copy differs from its example only in `family:` and the schema modeline, and nothing is
ever overwritten. The output is pinned in tests/golden/cli/init.txt."""

from __future__ import annotations

import os

import pytest
from compilerkit import GOLDEN, REPO, SPECS, cascadec, check_golden, spec_id

from cascadec import examples


def test_every_spec_in_specs_is_a_named_example():
    assert sorted(f for f, _ in examples.EXAMPLES.values()) == sorted(f"{spec_id(s)}.yaml" for s in SPECS)
    assert examples.DEFAULT in examples.EXAMPLES


@pytest.mark.parametrize("name", list(examples.EXAMPLES))
def test_each_example_starts_a_spec_that_compiles(tmp_path, name):
    run = cascadec("init", "my-family", "--from", name, "-o", "specs/my-family.yaml", cwd=tmp_path)
    assert (run.code, run.err) == (0, ""), run.err
    written = (tmp_path / "specs" / "my-family.yaml").read_text()
    original = examples.path(name).read_text()
    changed = [(a, b) for a, b in zip(original.splitlines(), written.splitlines()) if a != b]
    assert len(written.splitlines()) == len(original.splitlines())
    assert [b for _, b in changed] == [
        f"# yaml-language-server: $schema={os.path.relpath(REPO / 'schemas' / 'family.schema.json', tmp_path / 'specs')}",
        "family: my-family"]
    check = cascadec("validate", "specs/my-family.yaml", cwd=tmp_path)
    assert check.code == 0 and check.err == "", check.err
    assert check.out.startswith("ok: specs/my-family.yaml: family 'my-family', ")


def test_init_output_is_pinned(tmp_path, update_goldens):
    run = cascadec("init", "my-family", "--from", "qwen3", cwd=tmp_path)
    assert run.code == 0
    check_golden(GOLDEN / "cli" / "init.txt", run.out, update_goldens)
    assert (tmp_path / "my-family.yaml").is_file()  # NAME.yaml by default


def test_the_default_example_is_the_embedded_default(tmp_path):
    assert cascadec("init", "laptop", cwd=tmp_path).code == 0
    assert "family: laptop\n" in (tmp_path / "laptop.yaml").read_text()
    assert "builtin: stdlib" in (tmp_path / "laptop.yaml").read_text()


def test_init_never_overwrites(tmp_path):
    (tmp_path / "mine.yaml").write_text("my work\n")
    run = cascadec("init", "mine", cwd=tmp_path)
    assert run.code == 1
    assert run.err == ("error: mine.yaml already exists; cascadec init never overwrites a file\n"
                       "  = help: pass another path with -o, or remove it first\n")
    assert (tmp_path / "mine.yaml").read_text() == "my work\n"


@pytest.mark.parametrize("args, message", [
    (["Bad_Name"], "error: 'Bad_Name' is not a family name\n"),
    (["ok", "--from", "gpt-5"], "argument --from: invalid choice: 'gpt-5'"),
    ([], "the following arguments are required: NAME"),
])
def test_init_usage_errors(tmp_path, args, message):
    run = cascadec("init", *args, cwd=tmp_path)
    assert run.code == 2 and message in run.err
    assert list(tmp_path.iterdir()) == []


def test_the_cookbook_quotes_what_the_compiler_prints():
    """docs/cookbook.md walks through specs/cookbook/*.yaml; its quoted `graph --format ascii`
    lines and spec excerpts must still be what the files and the compiler say."""
    doc = (REPO / "docs" / "cookbook.md").read_text()
    for name in ("qwen3", "llama3.1", "params-target"):
        assert f"(../specs/cookbook/{name}.yaml)" in doc
    ascii_view = cascadec("graph", "specs/cookbook/qwen3.yaml", "--format", "ascii").out.splitlines()
    block = doc.split("```\nfamily 'qwen3-cascade'", 1)[1].split("```", 1)[0]
    quoted = ["family 'qwen3-cascade'" + block.splitlines()[0]] + block.splitlines()[1:]
    assert len(quoted) > 5
    for line in quoted:
        assert line.strip() == "..." or line in ascii_view, line
    specs = [(REPO / "specs" / "cookbook" / f"{n}.yaml").read_text() for n in ("qwen3", "llama3.1", "params-target")]

    def code(line: str) -> str:  # a YAML line without its comment
        return line.split(" #")[0].rstrip()

    excerpts = [block.split("```", 1)[0] for block in doc.split("```yaml\n")[1:]]
    assert len(excerpts) == 3
    for excerpt in excerpts:  # every excerpt is lines of one of the specs
        wanted = [code(x) for x in excerpt.splitlines() if code(x)]
        assert any(all(w in map(code, text.splitlines()) for w in wanted) for text in specs), excerpt
