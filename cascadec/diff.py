"""`cascadec diff`: explain the change between two plans in words, stage by stage.

Changed stages are listed field by field (config, launch, inputs); a stage whose own fields
are equal but whose hash moved is reported as invalidated by the upstream stage(s) that
changed. Pure: works on plan dicts.
"""

from __future__ import annotations

import json


def _flat(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def _show(v) -> str:
    return json.dumps(v, sort_keys=True)


def diff(old: dict, new: dict) -> list[str]:
    """Lines describing the change; empty when the plans are equal."""
    lines = []
    a = {s["id"]: s for s in old["stages"]}
    b = {s["id"]: s for s in new["stages"]}
    for name in sorted(set(old["models"]) | set(new["models"])):
        ma, mb = old["models"].get(name), new["models"].get(name)
        if ma != mb:
            if ma is None or mb is None:
                lines.append(f"model {name}: {'added' if ma is None else 'removed'}")
            else:
                for k, (x, y) in _changes(ma, mb).items():
                    lines.append(f"model {name}: {k}: {_show(x)} -> {_show(y)}")
    for sid in [s["id"] for s in new["stages"] if s["id"] not in a]:
        lines.append(f"+ {sid} ({b[sid]['kind']}): added")
    for sid in [s["id"] for s in old["stages"] if s["id"] not in b]:
        lines.append(f"- {sid} ({a[sid]['kind']}): removed")
    changed_own = set()
    for s in new["stages"]:
        sid = s["id"]
        if sid not in a or a[sid]["hash"] == s["hash"]:
            continue
        own = {}
        for field in ("config", "launch", "needs"):
            for k, v in _changes(a[sid].get(field), s.get(field)).items():
                own[f"{field}.{k}" if k else field] = v
        inputs_a = [{k: v for k, v in i.items()} for i in a[sid]["inputs"]]
        if inputs_a != s["inputs"]:
            own["inputs"] = (inputs_a, s["inputs"])
        if own:
            changed_own.add(sid)
            lines.append(f"~ {sid} ({s['kind']}): changed")
            for k, (x, y) in own.items():
                lines.append(f"    {k}: {_show(x)} -> {_show(y)}")
    for s in new["stages"]:
        sid = s["id"]
        if sid in a and a[sid]["hash"] != s["hash"] and sid not in changed_own:
            causes = sorted(_upstream_causes(sid, b, changed_own | (set(b) - set(a))))
            lines.append(f"! {sid} ({s['kind']}): invalidated by {', '.join(causes) or 'an input source change'}")
    ta, tb = old["totals"], new["totals"]
    if ta != tb and lines:
        lines.append(f"totals: FLOPs {ta['flops']:.3e} -> {tb['flops']:.3e}, device-hours "
                     f"{ta['device_hours']:,.2f} -> {tb['device_hours']:,.2f}")
    if not lines and old != new:
        for k, (x, y) in _changes(old, new).items():
            if not k.startswith("stages"):
                lines.append(f"{k}: {_show(x)} -> {_show(y)}")
    return lines


def _changes(x, y) -> dict:
    fx, fy = _flat(x or {}), _flat(y or {})
    return {k: (fx.get(k), fy.get(k)) for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)}


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
