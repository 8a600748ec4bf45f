"""Every spec in `specs/` validates, plans, equals its golden plan, and plans byte-identically
under any hash seed; every emitted plan satisfies `schemas/plan.schema.json`.

Goldens are `tests/golden/<name>.plan.json`, exactly what `cascadec plan specs/<name>.yaml -o
tests/golden/<name>.plan.json` writes (so `spec_file` is relative to tests/golden/). They change
only under `pytest --update-goldens`.
"""

from __future__ import annotations

import json

import pytest
import os

from compilerkit import GOLDEN, REPO, SPECS, cascadec, cascadec_subprocess, check_golden, plan_json, spec_id
from jsonschema import Draft202012Validator

from cascadec import plancheck
from cascadec.schema import family_schema

IDS = [spec_id(s) for s in SPECS]


def test_the_example_specs_are_there():
    assert {"tiny", "ministral3", "minitron", "cookbook/qwen3", "cookbook/llama3.1", "cookbook/params-target"} <= set(IDS)


@pytest.mark.parametrize("schema", [family_schema(), plancheck.plan_schema()], ids=["family", "plan"])
def test_schemas_are_valid_json_schema(schema):
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_spec_validates(spec):
    run = cascadec("validate", str(spec.relative_to(REPO)))
    assert run.code == 0, run.err
    assert run.out.startswith(f"ok: specs/{spec_id(spec)}.yaml: family ")
    assert "error[" not in run.err


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_spec_equals_its_golden_plan(spec, update_goldens):
    golden = GOLDEN / f"{spec_id(spec)}.plan.json"
    if update_goldens:  # exactly the documented command
        run = cascadec("plan", f"specs/{spec_id(spec)}.yaml", "-o", str(golden.relative_to(REPO)))
        assert run.code == 0, run.err
    check_golden(golden, plan_json(spec, os.path.relpath(spec, golden.parent)), False)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_plan_is_byte_identical_under_any_hash_seed(spec):
    outs = []
    for seed in ("0", "4242"):
        run = cascadec_subprocess("plan", f"specs/{spec_id(spec)}.yaml", "--format", "json", env={"PYTHONHASHSEED": seed})
        assert run.code == 0, run.err
        outs.append(run.out)
    assert outs[0] == outs[1]
    assert outs[0] == plan_json(spec, f"specs/{spec_id(spec)}.yaml")  # and in-process agrees


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_emitted_plan_satisfies_the_plan_schema(spec):
    plan = json.loads(plan_json(spec, f"specs/{spec_id(spec)}.yaml"))
    assert plancheck.problems(plan) == []


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_golden_plan_loads_as_a_saved_plan(spec):
    golden = GOLDEN / f"{spec_id(spec)}.plan.json"
    plan = plancheck.load(str(golden))
    assert isinstance(plan, dict), plan
    assert (golden.parent / plan["spec_file"]).resolve() == spec


def test_ministral3_parameter_counts():
    plan = json.loads(plan_json(REPO / "specs" / "ministral3.yaml", "x"))
    models = plan["models"]
    assert models["mistral-small-3.1"]["params"] == 23_572_403_200
    assert "parent" in models["mistral-small-3.1"]["role"]
    assert models["ministral-3-14b"]["params"] == 13_506_073_600
    assert models["ministral-3-8b"]["params"] == 8_489_553_920
    assert models["ministral-3-3b"]["params"] == 3_429_006_336


def test_plan_has_no_machine_specific_values():
    """No absolute paths, hostnames or timestamps: the committed plan is the same everywhere."""
    import socket

    text = plan_json(REPO / "specs" / "ministral3.yaml", "../../specs/ministral3.yaml")
    assert str(REPO) not in text
    assert socket.gethostname() not in text
