"""Names -> things: the family's checkpoint namespace, stage ids, and every child's shape.

Shared by `checks` (to judge references) and `graph`/`plan` (to build on them). Pure.

Checkpoint references:
    model                      a model of `models` (or a bootstrapped one)
    child/pruned               the child right after pruning
    child/phase                a pretraining-distillation phase
    child/variant/step         a post-training step
Inside a child, `from` may drop the child's name (`short`, `instruct/sft`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import Shape, Solution, solution
from .source import where
from .spec import DEFAULT_METHODS, ChildSpec, FamilySpec, Share, Training


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    ref: str
    stage: str | None  # producing stage id; None for an external model
    model: str | None  # the model name for external models
    child: str | None  # owning child, if any
    order: int  # position in plan order, for "refers to a later checkpoint" checks


def stage_id(kind: str, *parts: str) -> str:
    return "/".join((kind, *parts))


def training_stage_id(child: ChildSpec, t: Training, variant: str | None = None) -> str:
    if variant is None:
        return stage_id("distill", child.name, t.name)
    return stage_id(t.kind, child.name, variant, t.name)


def checkpoints(spec: FamilySpec) -> dict[str, Checkpoint]:
    """Every checkpoint the family names, in plan order. Later duplicates do not overwrite."""
    out: dict[str, Checkpoint] = {}

    def add(ref, stage, model=None, child=None):
        out.setdefault(ref, Checkpoint(ref=ref, stage=stage, model=model, child=child, order=len(out)))

    for m in spec.models.values():
        add(m.name, stage_id("bootstrap", m.name) if m.bootstrap else None, model=m.name)
    for c in spec.children:
        add(f"{c.name}/pruned", stage_id("prune", c.name), child=c.name)
        for p in c.phases:
            add(f"{c.name}/{p.name}", training_stage_id(c, p), child=c.name)
        for vname, steps in c.variants:
            for s in steps:
                add(f"{c.name}/{vname}/{s.name}", training_stage_id(c, s, vname), child=c.name)
        for basis in c.control:
            add(control_ref(c.name, basis), stage_id("control", c.name, basis), child=c.name)
    return out


def control_ref(child: str, basis: str) -> str:
    """The checkpoint a control writes: `tiny-c/control/compute-matched` (stage control/tiny-c/compute-matched)."""
    return f"{child}/control/{basis}"


def lookup(ref: str | None, cps: dict[str, Checkpoint], child: ChildSpec | None = None) -> Checkpoint | None:
    """Resolve a reference; inside ``child`` a local name (`short`) is tried first."""
    if ref is None:
        return None
    if child is not None and f"{child.name}/{ref}" in cps:
        return cps[f"{child.name}/{ref}"]
    return cps.get(ref)


def starts(child: ChildSpec) -> dict[str, str | None]:
    """The checkpoint ref each training of a child starts from (defaults applied)."""
    out = {}
    previous = f"{child.name}/pruned"
    for p in child.phases:
        out[f"{child.name}/{p.name}"] = p.start if p.start else previous
        previous = f"{child.name}/{p.name}"
    for vname, steps in child.variants:
        previous = None
        for s in steps:
            out[f"{child.name}/{vname}/{s.name}"] = s.start if s.start else previous
            previous = f"{child.name}/{vname}/{s.name}"
    return out


def shapes(spec: FamilySpec, cps: dict[str, Checkpoint]) -> dict[str, Shape | None]:
    """Shape of every model and child (None where unknown: a missing arch, a bad ref, a cycle,
    an unreachable `params` target). A child's checkpoints all share the child's shape."""
    out: dict[str, Shape | None] = {m.name: m.arch for m in spec.models.values()}
    pending = list(spec.children)
    for _ in range(len(pending) + 1):  # children may be listed before their source
        rest = []
        waiting = {x.name for x in pending}
        for c in pending:
            src = lookup(c.prune_from, cps)
            owner = None if src is None else (src.model or src.child)
            if owner is not None and owner not in out and owner in waiting:
                rest.append(c)
                continue
            out[c.name] = child_shape(c, out.get(owner) if owner else None)
        if len(rest) == len(pending):
            for c in rest:
                out[c.name] = None
            break
        pending = rest
    return out


def child_shape(c: ChildSpec, source: Shape | None) -> Shape | None:
    if source is None:
        return None
    if c.shape.params is None:
        return source.replace(**c.shape.explicit)
    found = solve(c, source)
    return None if found is None else found.shape


def solve(c: ChildSpec, source: Shape) -> Solution | None:
    """The solved shape of a child with a `params` target, and the candidates it was chosen from."""
    req = c.shape
    return solution(source, req.params, fixed=req.explicit, axes=req.solve_axes, tolerance=req.tolerance,
                    multiple_of=req.multiple_of, order=req.order)


def methods(c: ChildSpec, source: Shape, target: Shape) -> tuple[dict, dict]:
    """The pruning method of every axis (None where the axis keeps its size) and the provenance of
    each method used: the spec's `pruning.<axis>`, else DEFAULT_METHODS (heads: `kv_groups`
    when the KV heads shrink, since `query` keeps them)."""
    shrinks = {a for a in ("layers", "hidden", "ffn", "heads", "kv_heads") if getattr(target, a) < getattr(source, a)}
    if "kv_heads" in shrinks:
        shrinks.add("heads")
    out, how = {}, {}
    for axis, default in DEFAULT_METHODS.items():
        if axis not in shrinks:
            out[axis] = None
        elif axis in c.methods:
            out[axis], how[axis] = c.methods[axis], f"spec:{where((*c.at, 'pruning', axis))}"
        elif axis == "heads" and target.kv_heads < source.kv_heads:
            out[axis], how[axis] = "kv_groups", "default: kv_groups, since kv_heads shrink"
        else:
            out[axis], how[axis] = default, "default"
    return out, how


def contexts(spec: FamilySpec, cps: dict[str, Checkpoint]) -> dict[str, int | None]:
    """The context length (max_position_embeddings) of every checkpoint; None where unknown.

    A model has its own; a pruned child has its source's; a phase that sets
    `max_position_embeddings` (or a `rope` change alone, which the plan writes as its seq_len)
    has that, and every other training has its starting checkpoint's."""
    trains = {ref: (c, t) for c, _, t, ref in trainings(spec)}
    children = {c.name: c for c in spec.children}
    out: dict[str, int | None] = {}

    def context(ref: str, visiting: frozenset) -> int | None:
        if ref in out:
            return out[ref]
        cp = cps.get(ref)
        if cp is None or ref in visiting:
            return None
        visiting = visiting | {ref}
        if cp.model is not None:
            value = spec.models[cp.model].context
        elif ref in trains:
            c, t = trains[ref]
            start = lookup(starts(c)[ref], cps, c)
            value = t.options.get("max_position_embeddings", t.seq_len if "rope" in t.options else None)
            if value is None:
                value = None if start is None else context(start.ref, visiting)
        elif ref.endswith("/pruned") and cp.child in children:
            src = lookup(children[cp.child].prune_from, cps)
            value = None if src is None else context(src.ref, visiting)
        else:
            value = None
        out[ref] = value
        return value

    for ref in cps:
        context(ref, frozenset())
    return out


def budget(t: Training, spec: FamilySpec) -> int | None:
    """A training's tokens as an absolute count (shares of the family budget resolved)."""
    if isinstance(t.tokens, Share):
        if spec.budget_tokens is None:
            return None
        return int(t.tokens.fraction * spec.budget_tokens)
    return t.tokens


def steps(t: Training, spec: FamilySpec) -> int | None:
    """Optimiser steps: tokens // (seq_len x global batch); prompts // global batch for RL."""
    per_step = t.settings["batch.global"]
    if t.kind in ("odpo", "grpo"):
        return None if t.prompts is None else t.prompts // per_step
    total = budget(t, spec)
    if total is None or not t.seq_len:
        return None
    return total // (t.seq_len * per_step)


def rounding(t: Training, spec: FamilySpec) -> tuple[int, int, int, str] | None:
    """(asked, trained, per step, unit) when whole steps cover less than the budget asked:
    steps round down, so `tokens: 94B` at 4,718,592 tokens per step trains 93,999,071,232."""
    n = steps(t, spec)
    if not n:
        return None
    if t.kind in ("odpo", "grpo"):
        asked, per, unit = t.prompts, t.settings["batch.global"], "prompts"
    else:
        asked, per, unit = budget(t, spec), t.seq_len * t.settings["batch.global"], "tokens"
    return (asked, n * per, per, unit) if n * per < asked else None


def rounding_note(t: Training, spec: FamilySpec) -> str | None:
    """The plan's note for `rounding`, with the exact figures."""
    r = rounding(t, spec)
    if r is None:
        return None
    asked, trained, per, unit = r
    how = f"seq_len {t.seq_len:,} x batch {t.settings['batch.global']:,}" if unit == "tokens" else "the global batch"
    return (f"asked {asked:,} {unit}; trains {trained:,} ({asked - trained:,} fewer, {(asked - trained) / asked:.3%}): "
            f"{trained // per:,} whole steps of {per:,} {unit} ({how}); steps round down")


def trainings(spec: FamilySpec):
    """(child, variant or None, training, checkpoint ref) for every training, in plan order."""
    for c in spec.children:
        for p in c.phases:
            yield c, None, p, f"{c.name}/{p.name}"
        for vname, steps_ in c.variants:
            for s in steps_:
                yield c, vname, s, f"{c.name}/{vname}/{s.name}"


def cycle_at(spec: FamilySpec, cycle: list[str]) -> tuple | None:
    """The document path of the reference that closes a stage cycle: a `teacher` first (the usual
    mistake: a checkpoint teaching its own ancestor), else a `from`, else a `prune_from`."""
    cps = checkpoints(spec)
    edges = set(zip(cycle, [*cycle[1:], cycle[0]]))
    found = {}
    for c, _, t, ref in trainings(spec):
        stage = cps[ref].stage
        into = {u for u, v in edges if v == stage}
        if not into:
            continue
        teacher = lookup(t.teacher, cps, c)
        if teacher is not None and (teacher.stage in into or any(u.startswith("teacher-logits/") for u in into)):
            found.setdefault("teacher", (*t.at, "teacher"))
        start = lookup(starts(c)[ref], cps, c)
        if start is not None and start.stage in into:
            found.setdefault("from", (*t.at, "from") if t.start else t.at)
    for c in spec.children:
        if any(v in (stage_id("calibrate", c.name), stage_id("prune", c.name)) for _, v in edges):
            found.setdefault("prune_from", (*c.at, "prune_from"))
    return next((found[k] for k in ("teacher", "from", "prune_from") if k in found), None)


def trained_tokens(t: Training, spec: FamilySpec) -> int:
    """Tokens a training consumes as the plan runs it (whole steps); 0 for odpo/grpo (prompts)."""
    n = steps(t, spec) or 0
    return 0 if t.kind in ("odpo", "grpo") else n * t.seq_len * t.settings["batch.global"]


def lineage(spec: FamilySpec, cps: dict[str, Checkpoint], ref: str) -> dict[str, int]:
    """Every training the checkpoint ``ref`` descends from, itself included: stage id -> tokens, in
    plan order. Descends = through `from` (or the previous phase), `prune_from`, and each teacher
    (a teacher's own making is compute spent on this checkpoint); a bootstrapped model counts its
    bootstrap, an external model nothing. Each stage once, however many paths lead to it.
    Forward-only work (calibration, teacher-logits caches) and controls are not trainings."""
    trains = {r: (c, t) for c, _, t, r in trainings(spec)}
    children = {c.name: c for c in spec.children}
    found: dict[str, int] = {}
    seen: set = set()

    def visit(r: str | None) -> None:
        cp = cps.get(r) if r is not None else None
        if cp is None or r in seen:
            return
        seen.add(r)
        if cp.model is not None:
            m = spec.models[cp.model]
            if m.bootstrap is not None:
                found[cp.stage] = trained_tokens(m.bootstrap, spec)
        elif r in trains:
            c, t = trains[r]
            found[cp.stage] = trained_tokens(t, spec)
            start = lookup(starts(c)[r], cps, c)
            visit(None if start is None else start.ref)
            teacher = lookup(t.teacher, cps, c)
            visit(None if teacher is None else teacher.ref)
        elif r.endswith("/pruned") and cp.child in children:
            src = lookup(children[cp.child].prune_from, cps)
            visit(None if src is None else src.ref)

    visit(ref)
    order = {cp.stage: cp.order for cp in cps.values()}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def trained_contexts(spec: FamilySpec, cps: dict[str, Checkpoint]) -> dict[str, int | None]:
    """The longest sequence each checkpoint was trained on: a bootstrap's seq_len, an external
    model's context (None where unknown), a pruned child its source's, a training the longer of
    its seq_len and its start's, a control its first phase's. Eval marks longer contexts."""
    trains = {r: (c, t) for c, _, t, r in trainings(spec)}
    children = {c.name: c for c in spec.children}
    out: dict[str, int | None] = {}

    def context(r: str, visiting: frozenset) -> int | None:
        cp = cps.get(r)
        if r in out or cp is None or r in visiting:
            return out.get(r)
        visiting = visiting | {r}
        if cp.model is not None:
            m = spec.models[cp.model]
            value = m.bootstrap.seq_len if m.bootstrap is not None else m.context
        elif r in trains:
            c, t = trains[r]
            start = lookup(starts(c)[r], cps, c)
            before = None if start is None else context(start.ref, visiting)
            value = max(t.seq_len, before or 0) or None
        elif r.endswith("/pruned") and cp.child in children:
            src = lookup(children[cp.child].prune_from, cps)
            value = None if src is None else context(src.ref, visiting)
        else:  # a control: its first phase's sequence length
            value = children[cp.child].phases[0].seq_len if cp.child in children else None
        out[r] = value
        return value

    for r in cps:
        context(r, frozenset())
    return out
