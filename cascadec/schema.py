"""Pass 2 — schema: Document -> diagnostics from `schemas/family.schema.json`, located at line:col.

JSON Schema errors are rewritten into one sentence each (what is wrong, how to fix it); the
raw validator text is never shown. Pure: reads the packaged schema once, touches nothing else.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources

from . import counts
from .diagnostics import Diagnostic, closest, did_you_mean
from .source import Document, where

TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
              "number": "a number", "boolean": "true or false", "null": "null"}


@cache
def family_schema() -> dict:
    return json.loads(resources.files("cascadec.schemas").joinpath("family.schema.json").read_text())


@cache
def _validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(family_schema())


def _type_of(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    for name, t in (("object", dict), ("array", list), ("string", str), ("integer", int), ("number", float)):
        if isinstance(value, t):
            return name
    return "null"


def _where(path) -> str:
    return where(tuple(path)) or "the top level"


def _leaf(error):
    """For anyOf/oneOf, the most specific sub-error (deepest path, then not a type error)."""
    while error.context:
        subs = sorted(error.context, key=lambda e: (-len(e.absolute_path), e.validator == "type", str(e.message)))
        deeper = [e for e in subs if len(e.absolute_path) > len(error.absolute_path)]
        if not deeper:
            return error
        error = deeper[0]
    return error


def _alternatives(error) -> list:
    """The leaf errors of an anyOf/oneOf/allOf at the error's own path (what each branch wanted)."""
    out = []
    for sub in error.context or ():
        if len(sub.absolute_path) == len(error.absolute_path):
            out.extend(_alternatives(sub) if sub.context else [sub])
    return out


def _diagnostic(doc: Document, error) -> Diagnostic:
    error = _leaf(error)
    if error.validator in ("anyOf", "oneOf"):
        # `tokens: 3 trillion` fails every branch at its own path; say what a count or a budget is
        alts = _alternatives(error)
        patterns = " ".join(e.schema["pattern"] for e in alts if e.validator == "pattern")
        numeric = [e for e in alts if e.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")]
        if isinstance(error.instance, (int, float)) and not isinstance(error.instance, bool) and numeric:
            error = numeric[0]  # `tokens: -3e12`: the number is out of range, not "not a budget"
        elif patterns and "%" in patterns:
            error = next(e for e in alts if e.validator == "pattern" and "%" in e.schema["pattern"])
        elif patterns:
            error = next(e for e in alts if e.validator == "pattern")
        elif isinstance(error.instance, str) and any(e.validator == "enum" for e in alts):
            error = next(e for e in alts if e.validator == "enum")  # `control: compute_matched`: name the choices
    path = tuple(error.absolute_path)
    where = _where(path)
    kind = error.validator
    value = error.instance
    schema = error.schema
    span = doc.span(path)
    help = None
    code = "CSC105"
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(value) - set(allowed))
        key = extra[0]
        code = "CSC101"
        message = f"unknown key '{key}' in {where}"
        span = doc.span((*path, key), key=True)
        hint = did_you_mean(key, allowed)
        help = (hint + " " if hint else "") + "allowed keys: " + ", ".join(allowed)
    elif kind == "required":
        missing = [k for k in schema["required"] if k not in value]
        code = "CSC102"
        message = f"missing required key '{missing[0]}' in {where}"
        desc = schema.get("properties", {}).get(missing[0], {}).get("description")
        help = f"add `{missing[0]}:`" + (f" ({desc[0].lower() + desc[1:].rstrip('.')})" if desc else "")
    elif kind == "type":
        code = "CSC103"
        want = schema["type"]
        wants = " or ".join(TYPE_NAMES[t] for t in (want if isinstance(want, list) else [want]))
        message = f"{where} must be {wants}, not {TYPE_NAMES[_type_of(value)]}"
        if want == "object" and not path:
            help = "a spec is a YAML mapping of `key: value` lines; start from specs/tiny.yaml"
        elif want == "object" and isinstance(value, list):
            help = "write `key: value` lines here, not `- item` lines"
        elif want == "array" and isinstance(value, dict):
            help = "write a list (`- item` lines) here"
        elif want in ("integer", "number") and isinstance(value, str):
            help = f"write {wants} here, without quotes or units"
    elif kind == "enum":
        code = "CSC104"
        choices = [str(c) for c in schema["enum"]]
        message = f"{where} is '{value}', which is not one of: {', '.join(choices)}"
        help = did_you_mean(value, choices)
    elif kind == "const":
        code = "CSC104"
        message = f"{where} must be {schema['const']!r}"
        help = f"write `{path[-1]}: {schema['const']}` (the spec language version this cascadec reads)"
    elif kind == "pattern" and "[KMBT]" in schema["pattern"]:
        code = "CSC104"
        message = f"{where} is '{value}', which is not a count"
        help = "write an integer or a number with a suffix K, M, B or T, e.g. 250B or 3T"
    elif kind == "pattern" and "%" in schema["pattern"]:
        code = "CSC104"
        message = f"{where} is '{value}', which is not a token budget"
        help = "write 250B, 3T, an integer, or a share of the family budget such as 30%"
    elif kind == "pattern" and path[-2:-1] == ("resources",):
        code = "CSC104"
        message = f"{where} is '{value}', which is not a Slurm name"
        help = "Slurm partition, account and qos names use letters, digits, '.', '_', '-' (and ',' between partitions)"
    elif kind == "pattern":
        code = "CSC104"
        message = f"{where} is '{value}', which is not a valid name or reference"
        help = "names use lower-case letters, digits, '.', '_' and '-'; references look like `model`, `child/phase` or `child/variant/step`"
    elif kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        code = "CSC104"
        op = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        message = f"{where} is {counts.written(doc, path) or value}; it must be {op} {schema[kind]}"
        help = f"write a number {op} {schema[kind]}"
    elif kind in ("minItems", "minProperties"):
        code = "CSC104"
        message = f"{where} is empty; it needs at least {schema[kind]} entr{'y' if schema[kind] == 1 else 'ies'}"
    elif kind == "oneOf" and path[-1:] == ("source",):
        code = "CSC104"
        message = f"{where} must set exactly one of `hub`, `path` or `bootstrap`"
        help = "e.g. `source: {hub: org/name}` or `source: {path: ../checkpoints/parent}`"
    elif kind in ("anyOf", "oneOf"):
        code = "CSC104"
        message = f"{where} is {json.dumps(value)}, which is not allowed here"
        help = schema.get("description")
    elif kind == "propertyNames":
        code = "CSC104"
        message = f"{where} has an invalid name: {error.message}"
        help = "names use lower-case letters, digits, '.', '_' and '-'"
    else:
        message = f"{where}: {error.message}"
    return Diagnostic(code=code, message=message, path=doc.path, span=span, help=help)


def _typo_of(error) -> str | None:
    """The allowed key that the first unknown key of an additionalProperties error misspells."""
    allowed = sorted(error.schema.get("properties", {}))
    extra = sorted(set(error.instance) - set(allowed))
    return closest(extra[0], allowed) if extra else None


def validate(doc: Document) -> list[Diagnostic]:
    """All schema diagnostics of the document, one per distinct error location and kind.

    Numbers that should be whole counts and are not (2.5, 1e400, `1.2345K`) get CSC106 from
    `counts`, and no second, vaguer diagnostic at the same place."""
    data = doc.data
    if isinstance(data, dict) and "cascadec" not in data and {"cascadec_version", "stages"} <= set(data):
        made_from = data.get("spec_file")
        return [Diagnostic(  # a saved plan where a spec belongs: say so, not "missing key 'cascadec'"
            code="CSC107", message="this is a plan (cascadec's output), not a family spec", path=doc.path,
            span=doc.span(("cascadec_version",), key=True),
            help=(f"give the spec it was made from: {os.path.normpath(os.path.join(os.path.dirname(doc.path), made_from))}"
                  if isinstance(made_from, str)
                  else "give the family spec (YAML) it was made from")
            + "; `cascadec run`, `status` and `diff` read plans")]
    out = counts.diagnostics(doc, family_schema())
    counted = {d.span for d in out}
    seen = set()
    errors = list(_validator().iter_errors(counts.whole(doc, family_schema())))
    typos = {(tuple(e.absolute_path), _typo_of(e)) for e in errors if e.validator == "additionalProperties"}
    for error in errors:
        if error.validator == "required" and any(
                (tuple(error.absolute_path), k) in typos for k in error.validator_value if k not in error.instance):
            continue  # `seqlen:` is reported as a typo of `seq_len`, not also as a missing `seq_len`
        d = _diagnostic(doc, error)
        if d.span in counted:
            continue
        if (d.span, d.message) not in seen:
            seen.add((d.span, d.message))
            out.append(d)
    return out
