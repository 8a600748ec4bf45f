"""Pass 6 — plan: stage DAG + spec -> the canonical plan (ordered, hashed, costed) and its JSON.

Stage order is topological with ties broken by id. A stage's hash is a Merkle hash over its
kind, config, launch and inputs, where a stage input contributes that stage's hash: editing one
knob changes exactly that stage's hash and its descendants'. Provenance is not hashed.
"""

from __future__ import annotations

import hashlib
import json

import networkx as nx

from . import __version__, resolve
from .shapes import param_count
from .spec import FamilySpec

PLAN_VERSION = 1
BYTES_TRAIN = 16  # bf16 weights + fp32 master, grads and two Adam moments, per parameter
BYTES_INFER = 2  # bf16 weights


def canonical(obj) -> str:
    """Sorted keys, 2-space indent, one value per line, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _estimate(stage: dict, hardware) -> dict:
    """Tokens, steps, FLOPs (6·N·D student + 2·N_teacher·D), memory per device, device-hours."""
    kind, cfg = stage["kind"], stage["config"]
    n = stage.get("_n", 0)
    n_teacher = stage.get("_n_teacher", 0)
    if kind in ("odpo", "grpo"):
        tokens = cfg["prompts"] * cfg["generation"]["samples"] * cfg["seq_len"]
    else:
        tokens = stage.get("_tokens", cfg.get("tokens", 0))
    if kind in ("calibrate", "teacher-logits", "eval"):
        flops = 2 * n * tokens
    elif kind in ("odpo", "grpo"):
        # generate (2ND) + policy update (6ND) + reference or old-policy forward (2ND), upper bound
        flops = 10 * n * tokens + 2 * n_teacher * tokens
    elif kind == "dpo":
        flops = 8 * n * tokens
    else:
        flops = 6 * n * tokens + 2 * n_teacher * tokens
    devices = stage["launch"]["devices"]
    sharded = stage["launch"]["strategy"] in ("fsdp", "deepspeed")
    training = kind in ("bootstrap", "control", "distill", "sft", "dpo", "odpo", "grpo")
    weights = BYTES_TRAIN * n if training else BYTES_INFER * n
    weights += BYTES_INFER * n_teacher
    memory = weights / devices if sharded else weights
    peak, mfu = hardware["peak_tflops"] * 1e12, hardware["mfu"]
    return {
        "tokens": tokens,
        "steps": cfg.get("steps", 0),
        "flops": flops,
        "memory_gb": round(memory / 1e9, 4),
        "device_hours": round(flops / (peak * mfu) / 3600, 4),
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
    for m in spec.models.values():
        used_as = {"teacher" for *_, t, _ in resolve.trainings(spec) if t.teacher and resolve.lookup(t.teacher, cps) and resolve.lookup(t.teacher, cps).model == m.name}
        if any(c.prune_from == m.name for c in spec.children):
            used_as.add("parent")
        models[m.name]["role"] = "+".join(sorted(used_as)) or "model"

    data = {name: _data_identity(spec, name) for name in spec.data}
    totals = {
        "stages": len(stages),
        "tokens": sum(s["estimate"]["tokens"] for s in stages if s["kind"] not in ("eval", "calibrate")),
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


def _model_identity(spec: FamilySpec, name: str) -> dict:
    m = spec.models[name]
    return {"source": m.source, "shape": m.arch.axes() if m.arch else None}


def _data_identity(spec: FamilySpec, name: str) -> dict:
    d = spec.data[name]
    return {"kind": d.kind, "paths": list(d.paths), "field": d.field, "builtin": d.builtin, "split": d.split,
            "mix": d.mix, "stream": d.stream, "shuffle": d.shuffle, "tokens": d.tokens}
