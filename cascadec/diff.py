"""`cascadec diff`: explain the change between two plans in words, summary first (Terraform's
"Plan: 1 to add, 2 to change"), then the spec lines that changed, then stage by stage.

    Plan: 1 stage changed, 9 invalidated downstream, 0 added, 0 removed; 10 of 39 stages would rerun (...)
    spec lines changed:  old.yaml:112: -  ...  /  new.yaml:112: +  ...
    ~ changed stage (kind): changed            its own fields, old -> new, then its cost change
    ! stage (kind): invalidated by X           own fields equal, hash moved because X (upstream) changed
    + added / - removed stage, with its cost
    totals: tokens, FLOPs and device-hours, old -> new (delta)

Counts (tokens, FLOPs, offsets, parameters, prompts) read as `cascadec plan` prints them (446.46K,
160.00B, 2.56Z), exactly wherever the rounded forms of old and new would look equal; other values
(seq_len, steps, LR) as in the spec. Pure: works on plan dicts and texts.
"""

from __future__ import annotations

import difflib
import json

from .text import si

MAX_SPEC_LINES = 40  # changed spec lines shown; the rest are counted


def _flat(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v) -> str:
    """A config value as JSON: `16384`, `0.0001`, `"cosine"`."""
    return json.dumps(v, sort_keys=True)


def _count(v) -> str:
    """A count as `cascadec plan` prints it: `446.46K`, `160.00B`; exact below a thousand."""
    return si(v) if _number(v) else _show(v)


def _exact(v) -> str:
    return f"{v:,}"


# Keys whose numbers are counts the plan table prints in SI units; others (seq_len, steps, lr)
# are shown exactly, as written in the spec.
COUNTS = ("tokens", "flops", "offset", "params", "prompts")


def _fmt(key: str):
    if key.startswith("inputs."):
        return _what
    return _count if key.rsplit(".", 1)[-1] in COUNTS else _show


def _what(v) -> str:
    return "(none)" if v is None else v


def _arrow(x, y, fmt=_show) -> str:
    """`old -> new`, with the delta for counts and costs: `900.00B -> 1.05T (+150.00B)`; for two
    lists of names that differ in members, which went and which came: `- "a", + "b"`."""
    if isinstance(x, list) and isinstance(y, list) and all(isinstance(v, str) for v in x + y) and set(x) != set(y):
        return ", ".join([f"- {_show(v)}" for v in x if v not in y] + [f"+ {_show(v)}" for v in y if v not in x])
    if fmt is _count and _number(x) and _number(y) and si(x) == si(y):
        fmt = _exact  # 900,000,000,000 -> 900,001,000,000 must not read as equal
    text = f"{fmt(x)} -> {fmt(y)}"
    if _number(x) and _number(y) and (fmt is not _show or float(x).is_integer() and float(y).is_integer()):
        delta = y - x  # counts and costs; no float noise for rates such as the LR
        text += f" ({'+' if delta >= 0 else '-'}{fmt(abs(delta))})"
    return text


def _hours(h: float) -> str:
    return f"{h:,.2f}"


COSTS = (("tokens", "tokens", _count), ("FLOPs", "flops", _count), ("device-hours", "device_hours", _hours))


def _cost_change(a: dict, b: dict) -> str | None:
    """`cost: tokens 900.00B -> 1.05T (+150.00B), ...` for the estimates that moved, else None."""
    ea, eb = a.get("estimate", {}), b.get("estimate", {})
    parts = [f"{label} {_arrow(ea.get(k, 0), eb.get(k, 0), fmt)}" for label, k, fmt in COSTS
             if ea.get(k, 0) != eb.get(k, 0)]
    return "cost: " + ", ".join(parts) if parts else None


def _cost(stage: dict) -> str:
    """`cost: tokens 150.00B, FLOPs 1.20Z, device-hours 1,234.00` of one stage."""
    e = stage.get("estimate", {})
    return "cost: " + ", ".join(f"{label} {fmt(e.get(k, 0))}" for label, k, fmt in COSTS)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def diff(old: dict, new: dict, *, spec_lines: list[str] = ()) -> list[str]:
    """Lines describing the change; empty when the plans are equal. ``spec_lines``: what
    `spec_changes` found between the two specs, shown after the summary."""
    a = {s["id"]: s for s in old["stages"]}
    b = {s["id"]: s for s in new["stages"]}
    added = [s for s in new["stages"] if s["id"] not in a]
    removed = [s for s in old["stages"] if s["id"] not in b]
    own: dict[str, dict] = {}  # changed stage -> {field: (old, new)}
    for s in new["stages"]:
        sid = s["id"]
        if sid not in a or a[sid]["hash"] == s["hash"]:
            continue
        fields = {}
        for field in ("config", "launch", "needs"):
            for k, v in _changes(a[sid].get(field), s.get(field)).items():
                fields[f"{field}.{k}" if k else field] = v
        fields.update(_input_changes(a[sid]["inputs"], s["inputs"]))
        if fields:
            own[sid] = fields
    invalidated = [s for s in new["stages"] if s["id"] in a and a[s["id"]]["hash"] != s["hash"] and s["id"] not in own]

    body = []
    for name in sorted(set(old["models"]) | set(new["models"])):
        ma, mb = old["models"].get(name), new["models"].get(name)
        if ma != mb:
            if ma is None or mb is None:
                body.append(f"model {name}: {'added' if ma is None else 'removed'}")
            else:
                body += [f"model {name}: {k}: {_arrow(x, y, _fmt(k))}" for k, (x, y) in _changes(ma, mb).items()]
    for s in added:
        body += [f"+ {s['id']} ({s['kind']}): added", f"    {_cost(s)}"]
    for s in removed:
        body += [f"- {s['id']} ({s['kind']}): removed", f"    {_cost(s)}"]
    for sid, fields in own.items():
        body.append(f"~ {sid} ({b[sid]['kind']}): changed")
        body += [f"    {k}: {_arrow(x, y, _fmt(k))}" for k, (x, y) in fields.items()]
        cost = _cost_change(a[sid], b[sid])
        if cost:
            body.append(f"    {cost}")
    for s in invalidated:
        causes = sorted(_upstream_causes(s["id"], b, set(own) | {x["id"] for x in added}))
        body.append(f"! {s['id']} ({s['kind']}): invalidated by {', '.join(causes) or 'an input source change'}")
    ta, tb = old["totals"], new["totals"]
    if ta != tb and body:
        body.append("totals: " + ", ".join(f"{label} {_arrow(ta.get(k, 0), tb.get(k, 0), fmt)}"
                                           for label, k, fmt in COSTS if ta.get(k, 0) != tb.get(k, 0)))
    if not body and old != new:  # only top-level fields moved (e.g. the hardware's MFU)
        body = [f"{k}: {_arrow(x, y, _fmt(k))}" for k, (x, y) in _changes(old, new).items() if not k.startswith("stages")]
    if not body:
        return []
    rerun = [*added, *(b[sid] for sid in own), *invalidated]
    hours = sum(s.get("estimate", {}).get("device_hours", 0) for s in rerun)
    head = (f"Plan: {_plural(len(own), 'stage')} changed, {len(invalidated)} invalidated downstream, "
            f"{len(added)} added, {len(removed)} removed; {len(rerun)} of {_plural(len(new['stages']), 'stage')} "
            f"would rerun ({_hours(hours)} of {_hours(tb.get('device_hours', 0))} device-hours).")
    return [head, *([""] + list(spec_lines) if spec_lines else []), "", *body]


def spec_changes(old_path: str, old_text: str, new_path: str, new_text: str) -> list[str]:
    """The spec lines that changed, as `file:line: - old` / `file:line: + new` (difflib's
    line matching; at most MAX_SPEC_LINES, then a count)."""
    x, y = old_text.splitlines(), new_text.splitlines()
    rows = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, x, y, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        rows += [(f"{old_path}:{i + 1}:", "-", x[i]) for i in range(i1, i2)]
        rows += [(f"{new_path}:{j + 1}:", "+", y[j]) for j in range(j1, j2)]
    if not rows:
        return []
    width = max(len(r[0]) for r in rows[:MAX_SPEC_LINES])
    out = ["spec lines changed:"] + [f"  {where:<{width}} {sign} {text}" for where, sign, text in rows[:MAX_SPEC_LINES]]
    if len(rows) > MAX_SPEC_LINES:
        out.append(f"  ... and {len(rows) - MAX_SPEC_LINES} more changed lines")
    return out


def _changes(x, y) -> dict:
    fx, fy = _flat(x or {}), _flat(y or {})
    return {k: (fx.get(k), fy.get(k)) for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)}


def _input_changes(x: list, y: list) -> dict:
    """{`inputs.<role>`: (old, new)} for the inputs that went, came or point elsewhere, each
    shown by what it reads (`stage control/tiny-c/equal-tokens`, `model parent`, `data pretrain`)."""
    def what(i):
        return None if i is None else " ".join(f"{k} {i[k]}" for k in ("stage", "model", "data") if k in i) or _show(i)

    a, b = ({i["role"]: i for i in inputs} for inputs in (x, y))
    return {f"inputs.{r}": (what(a.get(r)), what(b.get(r))) for r in sorted(set(a) | set(b)) if a.get(r) != b.get(r)}


def _upstream_causes(sid: str, stages: dict, changed: set) -> set:
    """The changed stages upstream of ``sid`` that are nearest to it."""
    out, stack, seen = set(), list(stages[sid]["needs"]), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in changed:
            out.add(n)
        else:
            stack.extend(stages[n]["needs"])
    return out
