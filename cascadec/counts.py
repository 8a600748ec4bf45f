"""Counts: every value the schema wants as a whole number, read exactly (`3e12` is 3T).

YAML reads `3e12`, `3.0e+12` and `4096.0` as floats, and JSON Schema calls an integral float an
integer, so they pass validation; here the schema is walked beside the document to find each
number at a position that takes integers only (token budgets, steps, batches, samples, seq_len,
layers, hidden, ...) and each `1.5K`-style count. A value is a count when the text the user wrote
is an exact whole number (read with `Decimal`, never through a float: `1e30` is 10**30);
anything else (2.5, 1e400, .nan, `1.2345K`) is a located diagnostic. Pure.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from decimal import Decimal, InvalidOperation

from .diagnostics import Diagnostic
from .source import Document, where

SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
LARGEST = 2**63 - 1  # counts become int64 tensors, step counters and float estimates downstream
_SUFFIXED = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMBT])$")


def suffixed(text: str) -> Decimal | None:
    """`1.5K` -> Decimal(1500); None when ``text`` is not a suffixed count."""
    m = _SUFFIXED.match(text)
    return Decimal(m[1]) * SUFFIX[m[2]] if m else None


@lru_cache(maxsize=4)
def _lines(text: str) -> list[str]:
    return text.splitlines()


def written(doc: Document, path: tuple) -> str | None:
    """The scalar exactly as the user wrote it (from the span of its node), if it is one line."""
    span = doc.spans.get(path)
    if span is None or span.end_col is None:
        return None
    lines = _lines(doc.text)
    return lines[span.line - 1][span.col - 1:span.end_col - 1] if span.line <= len(lines) else None


def _exact(doc: Document, path: tuple, value: float) -> int | None:
    """The whole number the user wrote at ``path``, or None when it is not one."""
    text = written(doc, path)
    try:
        d = Decimal(text.replace("_", "")) if text is not None else Decimal(value)
    except InvalidOperation:
        d = Decimal(value) if math.isfinite(value) else None
    if d is None or not d.is_finite() or d != d.to_integral_value():
        return None
    return int(d)


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _walk(schema: dict, value, path: tuple, root: dict, types: dict, quantities: dict) -> None:
    """Collect, per path, the JSON types the schema allows there, and the paths where a suffixed
    count may stand."""
    schema = _resolve(schema, root)
    t = schema.get("type")
    if t is not None:
        types.setdefault(path, set()).update(t if isinstance(t, list) else [t])
    if "[KMBT]" in schema.get("pattern", ""):  # a suffixed count may stand here
        quantities[path] = value
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(key, ()):
            _walk(branch, value, path, root, types, quantities)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                _walk(sub, v, (*path, k), root, types, quantities)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            _walk(schema["items"], v, (*path, i), root, types, quantities)


def _positions(doc: Document, schema: dict):
    """(path, value) of every number where only integers are allowed, and (path, value) of every
    position where a suffixed count may stand."""
    types: dict = {}
    quantities: dict = {}
    _walk(schema, doc.data, (), schema, types, quantities)
    numbers = []
    for path, allowed in types.items():
        if "integer" in allowed and "number" not in allowed:
            value = _get(doc.data, path)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers.append((path, value))
    return numbers, quantities


def _get(data, path: tuple):
    for p in path:
        data = data[p]
    return data


def whole(doc: Document, schema: dict) -> object:
    """``doc.data`` with every exactly-whole float at an integer position replaced by its int
    (copied along the changed paths only; the document is not mutated)."""
    floats, _ = _positions(doc, schema)
    data = doc.data
    for path, value in floats:
        n = _exact(doc, path, value) if isinstance(value, float) else None
        if n is not None:
            data = _set(data, path, n)
    return data


def _set(data, path: tuple, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        return {**data, head: _set(data[head], rest, value)}
    out = list(data)
    out[head] = _set(data[head], rest, value)
    return out


def diagnostics(doc: Document, schema: dict) -> list[Diagnostic]:
    """CSC106 for every number that should be a whole count and is not, or is too large."""
    numbers, quantities = _positions(doc, schema)
    out = []

    def diag(path, message, help):
        out.append(Diagnostic(code="CSC106", message=f"{where(path)} is {message}", path=doc.path,
                              span=doc.span(path), help=help))

    for path, value in numbers:
        n = _exact(doc, path, value) if isinstance(value, float) else value
        if n is not None and n <= LARGEST:
            continue
        text = written(doc, path) or repr(value)
        is_count = path in quantities
        if n is None:
            what = ("not a number" if math.isnan(value) else
                    "too large to be a count (it reads as infinity)" if math.isinf(value) else "not a whole number")
            diag(path, f"{text}, which is {what}",
                 "a count is a whole number: write an integer (3e12 is fine) or a suffixed count such as 250B or 3T"
                 if is_count else "write a whole number here")
        elif n > LARGEST:
            diag(path, f"{text}, which is too large to be a count",
                 f"the largest count is {LARGEST:,} (2^63 - 1); check the exponent or the suffix")
    for path, text in quantities.items():
        n = suffixed(text) if isinstance(text, str) else None
        if n is None:
            continue
        if n != n.to_integral_value():
            diag(path, f"{text}, which is {n.normalize():,f}, not a whole number",
                 "a count is a whole number: use fewer decimals or a smaller suffix "
                 f"(e.g. {int(n):,} or {_suffix_form(int(n))})")
        elif n > LARGEST:
            diag(path, f"{text}, which is too large to be a count",
                 f"the largest count is {LARGEST:,} (2^63 - 1); check the suffix")
    return out


def _suffix_form(n: int) -> str:
    for s in ("T", "B", "M", "K"):
        if n >= SUFFIX[s]:
            return f"{Decimal(n) / SUFFIX[s]:f}".rstrip("0").rstrip(".") + s
    return str(n)

