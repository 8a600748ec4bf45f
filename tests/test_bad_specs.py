"""Bad specs and their exact rendered diagnostics, plus robustness: nothing ever prints a traceback.

`bad_specs/NAME.yaml` is compared byte for byte with `bad_specs/NAME.expected`, the stderr of
`cascadec validate tests/bad_specs/NAME.yaml` run from the repository root. Each file opens with a
comment saying what it gets wrong (files whose bytes are the point, e.g. not UTF-8, carry none).
`pytest --update-goldens` rewrites the expected files; read every one before committing it.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import yaml
from compilerkit import REPO, cascadec, cascadec_subprocess, check_golden

from cascadec import compile as compiler, source
from cascadec.diagnostics import CompileError, render_all

BAD = REPO / "tests" / "bad_specs"
CASES = sorted(BAD.glob("*.yaml"))
HEADER = re.compile(r"^(?P<where>\S+?)(:(?P<line>\d+):(?P<col>\d+))?: (?P<sev>error|warning)\[(?P<code>CSC\d{3})\]: ",
                    re.M)
UNLOCATED = {"empty", "only_comments", "top_level_list", "binary_png"}  # nothing (or only 1:1) to point at
WARN_ONLY = {"teacher_smaller"}


def _rel(path) -> str:
    return str(path.relative_to(REPO))


def test_there_are_enough_bad_specs():
    assert len(CASES) >= 25


@pytest.mark.parametrize("spec", CASES, ids=[c.stem for c in CASES])
def test_bad_spec_diagnostics(spec, update_goldens):
    run = cascadec("validate", _rel(spec))
    check_golden(spec.with_suffix(".expected"), run.err, update_goldens)
    assert "Traceback" not in run.err
    if spec.stem in WARN_ONLY:
        assert run.code == 0 and "error[" not in run.err and "warning[" in run.err
        assert run.out.startswith(f"ok: {_rel(spec)}")
    else:
        assert run.code == 1 and "error[" in run.err and run.out == ""


@pytest.mark.parametrize("spec", CASES, ids=[c.stem for c in CASES])
def test_every_diagnostic_is_located_and_helps(spec):
    """One header per diagnostic, pointing into the file, each with a `help:` line."""
    with open(spec.with_suffix(".expected"), encoding="utf-8") as f:
        text = f.read()
    blocks = [b for b in text.split("\n\n") if HEADER.match(b)]
    assert blocks, text
    n_lines = spec.read_bytes().count(b"\n") + 1
    for block in blocks:
        m = HEADER.match(block)
        assert m["where"] == _rel(spec)
        if spec.stem not in UNLOCATED and not block.startswith(f"{_rel(spec)}: error[CSC002]"):
            assert m["line"], f"unlocated: {block}"
        if m["line"]:
            assert 1 <= int(m["line"]) <= n_lines
        assert "\n  = help: " in block, f"no help line: {block}"
    summary = text.rstrip("\n").rsplit("\n", 1)[-1]
    assert re.fullmatch(r"(\d+ errors?)?(, )?(\d+ warnings?)?", summary), summary


def test_the_real_cli_never_prints_a_traceback():
    """All bad specs through one real `cascadec validate` process: exit 1, the stderr of each file
    in turn, and no traceback."""
    run = cascadec_subprocess("validate", *map(_rel, CASES))
    assert run.code == 1
    assert "Traceback" not in run.err
    expected = ""
    for spec in CASES:
        with open(spec.with_suffix(".expected"), encoding="utf-8") as f:
            expected += f.read()
    assert run.err == expected


def test_missing_file_and_directory(tmp_path):
    for target, message in ((tmp_path / "nope.yaml", "no such file"), (tmp_path, "is a directory")):
        run = cascadec("validate", str(target))
        assert run.code == 1 and message in run.err and "Traceback" not in run.err


def test_oversized_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (source.MAX_BYTES // 10 + 1))
    run = cascadec("validate", str(big))
    assert run.code == 1 and "larger than 4 MiB" in run.err


# -- fuzz: small mutations of the tiny spec ------------------------------------------------------

TINY = (REPO / "specs" / "tiny.yaml").read_text()
REPLACEMENTS = [None, [], {}, "x", "", 0, -1, 2.5, True, "3T", "150%", 10**30, "parent", "tiny-a/short",
                [None], {"x": 1}, {"assumed": "x", "why": "w"}, {"assumed": None, "why": "w"}]


def _paths(obj, at=()):
    if at:
        yield at
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*at, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*at, i))


def _mutations(n: int, seed: int = 0):
    """``n`` (description, YAML text) pairs: structural edits of the parsed spec and raw text edits."""
    rng = random.Random(seed)
    data = yaml.safe_load(TINY)
    paths = list(_paths(data))
    lines = TINY.splitlines(keepends=True)
    for i in range(n):
        if i % 4 == 3:  # text level: drop a line, cut the file, or garble a byte
            how = rng.choice(("drop", "cut", "garble"))
            if how == "drop":
                k = rng.randrange(len(lines))
                yield f"drop line {k + 1}", "".join(lines[:k] + lines[k + 1:])
            elif how == "cut":
                k = rng.randrange(len(TINY))
                yield f"cut at byte {k}", TINY[:k]
            else:
                k = rng.randrange(len(TINY))
                c = rng.choice(":-[]{}&*!|>'\"#%@`\t")
                yield f"byte {k} -> {c!r}", TINY[:k] + c + TINY[k + 1:]
            continue
        doc = copy.deepcopy(data)
        at = rng.choice(paths)
        parent = doc
        for key in at[:-1]:
            parent = parent[key]
        how = rng.choice(("delete", "replace", "replace", "wrap"))
        if how == "delete":
            del parent[at[-1]]
            yield f"delete {at}", yaml.safe_dump(doc, sort_keys=False)
        elif how == "wrap":
            parent[at[-1]] = [parent[at[-1]]]
            yield f"wrap {at} in a list", yaml.safe_dump(doc, sort_keys=False)
        else:
            value = copy.deepcopy(rng.choice(REPLACEMENTS))
            parent[at[-1]] = value
            yield f"{at} = {value!r}", yaml.safe_dump(doc, sort_keys=False)


def test_fuzzed_tiny_specs_never_crash():
    """Every mutation either compiles or fails with located diagnostics that render; no other
    exception escapes (the CLI would print it as a traceback)."""
    outcomes = {"ok": 0, "diagnostics": 0}
    for what, text in _mutations(400):
        try:
            compiler.compile_doc(source.parse(text, "fuzz.yaml"), {})
            outcomes["ok"] += 1
        except CompileError as e:
            assert e.diagnostics, what
            rendered = render_all(e.diagnostics, {"fuzz.yaml": text})
            assert "error[" in rendered, what
            outcomes["diagnostics"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
    assert outcomes["diagnostics"] > 200 and outcomes["ok"] > 10, outcomes
