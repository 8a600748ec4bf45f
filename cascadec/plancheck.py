"""Reading a saved plan: JSON parsing and validation against `schemas/plan.schema.json`.

Returns the plan or one readable error string (never raises): a hand-edited or truncated
plan must not reach the runtime.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def plan_schema() -> dict:
    return json.loads(resources.files("cascadec.schemas").joinpath("plan.schema.json").read_text())


def problems(plan) -> list[str]:
    """Every schema violation of a plan dict, as `at <path>: <message>` lines."""
    from jsonschema import Draft202012Validator

    out = []
    for e in sorted(Draft202012Validator(plan_schema()).iter_errors(plan), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, e.absolute_path)) or "top level"
        out.append(f"at {where}: {e.message[:200]}")
    return out


def load(path: str) -> dict | str:
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except FileNotFoundError:
        return f"{path}: no such plan file"
    except (OSError, UnicodeDecodeError) as e:
        return f"{path}: cannot read: {e}"
    except json.JSONDecodeError as e:
        return f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}"
    found = problems(plan)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return f"{path}: not a valid cascadec plan: {found[0]}{more}"
    return plan
