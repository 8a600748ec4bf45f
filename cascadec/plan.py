"""Pass 6 — plan: stage DAG + spec -> the canonical plan (ordered, hashed, costed) and its JSON.

Stage order is topological with ties broken by id. A stage's hash is a Merkle hash over its
kind, config, launch and inputs, where a stage input contributes that stage's hash: editing one
knob changes exactly that stage's hash and its descendants'. Provenance is not hashed.
"""

from __future__ import annotations

import hashlib
import json

import networkx as nx

from . import __version__, estimate, resolve
from .shapes import SOLVE_RULES, param_count
from .spec import FamilySpec

PLAN_VERSION = 1


def canonical(obj) -> str:
    """Sorted keys, 2-space indent, one value per line, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _estimate(stage: dict, hardware) -> dict:
    """Tokens, steps, FLOPs (with attention), memory per device with its breakdown, device-hours.

    The formulas are `estimate.py`'s, written out in docs/plan.md ("Estimates").
    """
    kind, cfg, launch = stage["kind"], stage["config"], stage["launch"]
    n, shape = stage.get("_n", 0), stage.get("_shape")
    n_teacher, teacher = stage.get("_n_teacher", 0), stage.get("_teacher")
    if kind in ("odpo", "grpo"):
        tokens = cfg["prompts"] * cfg["generation"]["samples"] * cfg["seq_len"]
    else:
        tokens = stage.get("_tokens", cfg.get("tokens", 0))
    seq_len = cfg.get("seq_len", 0)
    total, attention = estimate.flops(kind, n=n, shape=shape, tokens=tokens, seq_len=seq_len,
                                      n_teacher=n_teacher, teacher=teacher)
    micro = cfg.get("batch_size") if kind == "calibrate" else cfg.get("micro_batch")
    if cfg.get("contexts"):  # an eval at several lengths: FLOPs summed over them, memory at the longest
        names = len(cfg["checkpoints"])
        parts = [estimate.flops(kind, n=n, shape=shape, tokens=c["tokens"] * names, seq_len=c["seq_len"],
                                n_teacher=0, teacher=None) for c in cfg["contexts"]]
        total, attention = sum(p[0] for p in parts), sum(p[1] for p in parts)
        longest = max(cfg["contexts"], key=lambda c: c["seq_len"])
        seq_len, micro = longest["seq_len"], longest["micro_batch"]
    parts = estimate.memory(kind, shape=shape, n=n, micro_batch=micro or 1, seq_len=seq_len,
                            devices=launch["devices"], strategy=launch["strategy"],
                            precision=cfg.get("precision", "fp32"),
                            checkpointing=bool(cfg.get("activation_checkpointing")),
                            chunk_tokens=(cfg.get("loss") or {}).get("chunk_tokens") or cfg.get("chunk_tokens") or 1024,
                            teacher=teacher, n_teacher=n_teacher)
    return {
        "tokens": tokens,
        "steps": cfg.get("steps", 0),
        "flops": total,
        "attention_flops": attention,
        "memory_gb": round(sum(parts.values()) / 1e9, 4),
        "memory": {k: round(v / 1e9, 4) for k, v in parts.items()},
        "device_memory_gb": stage.get("_budget"),
        "device_hours": round(estimate.device_hours(total, hardware["peak_tflops"], hardware["mfu"]), 4),
    }


def emit(g: nx.DiGraph, spec: FamilySpec) -> dict:
    order = list(nx.lexicographical_topological_sort(g))
    hashes: dict[str, str] = {}
    stages = []
    model_identity = {name: _model_identity(spec, name) for name in spec.models}
    for sid in order:
        st = dict(g.nodes[sid]["stage"])
        st["needs"] = sorted(g.predecessors(sid))
        hashed_inputs = []
        for inp in st["inputs"]:
            if "stage" in inp:
                hashed_inputs.append({**inp, "hash": hashes[inp["stage"]]})
            elif "model" in inp:
                hashed_inputs.append({**inp, "identity": model_identity[inp["model"]]})
            else:
                hashed_inputs.append({**inp, "source": _data_identity(spec, inp["data"])})
        hashes[sid] = _sha({"kind": st["kind"], "config": st["config"], "launch": st["launch"],
                            "inputs": hashed_inputs, "needs": st["needs"]})
        st["hash"] = hashes[sid]
        st["estimate"] = _estimate(st, spec.hardware)
        stages.append({k: v for k, v in st.items() if not k.startswith("_")})

    cps = resolve.checkpoints(spec)
    shapes = resolve.shapes(spec, cps)
    owned: dict[str, list[str]] = {}  # child -> its checkpoint refs (one pass: linear in the family)
    for r, cp in cps.items():
        owned.setdefault(cp.child, []).append(r)
    models = {}
    for m in spec.models.values():
        models[m.name] = {"role": "model", "source": m.source, "shape": m.arch.axes(), "params": param_count(m.arch),
                          "description": m.description, "provenance": m.arch_provenance}
    for c in spec.children:
        s = shapes[c.name]
        models[c.name] = {"role": "child", "prune_from": c.prune_from, "shape": s.axes(), "params": param_count(s),
                          "checkpoints": sorted(owned.get(c.name, []))}
        if c.shape.params is not None:
            models[c.name]["solved"] = _solved(c, shapes[cps[c.prune_from].model or cps[c.prune_from].child])
    for m in spec.models.values():
        used_as = {"teacher" for *_, t, _ in resolve.trainings(spec) if t.teacher and resolve.lookup(t.teacher, cps) and resolve.lookup(t.teacher, cps).model == m.name}
        if any(c.prune_from == m.name for c in spec.children):
            used_as.add("parent")
        models[m.name]["role"] = "+".join(sorted(used_as)) or "model"

    data = {name: _data_identity(spec, name) for name in spec.data}
    totals = {
        "stages": len(stages),
        "tokens": sum(s["estimate"]["tokens"] for s in stages if s["kind"] not in ("eval", "calibrate", "tokenize")),
        "flops": sum(s["estimate"]["flops"] for s in stages),
        "device_hours": round(sum(s["estimate"]["device_hours"] for s in stages), 2),
        "hardware": {"device": spec.hardware["device"], "peak_tflops": spec.hardware["peak_tflops"],
                     "mfu": spec.hardware["mfu"]},
    }
    if spec.from_scratch_tokens:
        scratch = sum(6 * param_count(shapes[c.name]) * spec.from_scratch_tokens for c in spec.children)
        totals["from_scratch"] = {
            "tokens_per_child": spec.from_scratch_tokens,
            "flops": scratch,
            "cascade_share": round(totals["flops"] / scratch, 4),
        }
    return {
        "cascadec_version": __version__,
        "plan_version": PLAN_VERSION,
        "family": spec.family,
        "description": spec.description,
        "spec_sha256": spec.spec_sha256,
        "models": models,
        "data": data,
        "stages": stages,
        "totals": totals,
        "assumed": [f"{'.'.join(map(str, path))}: {why}" for path, why in spec.assumed],
    }


def _solved(c, source) -> dict:
    """How a `params` target became the child's shape: the request, the rule, and the runners-up."""
    req, found = c.shape, resolve.solve(c, source)

    def brief(s):
        return {"layers": s.layers, "hidden": s.hidden, "ffn": s.ffn, "params": param_count(s)}

    return {"params": req.params, "axes": list(req.solve_axes), "tolerance": req.tolerance,
            "multiple_of": req.multiple_of, "order": req.order, "rule": SOLVE_RULES[req.order],
            "error": round(abs(param_count(found.shape) - req.params) / req.params, 6),
            "candidates": len(found.candidates), "runners_up": [brief(s) for s in found.candidates[1:4]]}


def _model_identity(spec: FamilySpec, name: str) -> dict:
    m = spec.models[name]
    return {"source": m.source, "shape": m.arch.axes() if m.arch else None}


def _data_identity(spec: FamilySpec, name: str) -> dict:
    d = spec.data[name]
    # Reader keys a source does not set are left out, so a plan shows (and hashes) only what was said.
    readers = {k: getattr(d, k) for k in ("hub", "revision", "subset", "format", "system", "on_error", "think",
                                          "unfinished")}
    if d.tasks is not None:
        readers["tasks"] = list(d.tasks)
    return {"kind": d.kind, "paths": list(d.paths), "field": d.field, "builtin": d.builtin, "split": d.split,
            "mix": d.mix, "stream": d.stream, "shuffle": d.shuffle, "tokens": d.tokens,
            **{k: v for k, v in readers.items() if v is not None}}
