"""Pass 6b — fit: the planned stages -> diagnostics for stages that do not fit their devices' memory.

Reads each stage's memory estimate (`estimate.py`, docs/plan.md "Estimates") and its budget
(`resources.memory_gb`, else the memory of `hardware.device`). Two rules, so that only the
impossible blocks a plan:
  CSC241 error    even spread evenly over all the stage's devices, the weights, gradients,
                  optimizer state and teacher weights exceed the budget: no runtime option helps;
  CSC242 warning  the estimate as the runtime runs the stage (sharding, activations, teacher,
                  loss buffers) exceeds it: an estimate, not a measurement, so it warns, with the
                  breakdown and the change that helps most.
Only stages whose resources the spec sets are checked (training, teacher-logits, calibrate, eval). Pure.
"""

from __future__ import annotations

import networkx as nx

from . import estimate
from .diagnostics import Diagnostic
from .source import Document

CHECKED = (*estimate.TRAINING, "teacher-logits", "calibrate", "eval")
CODES = ("CSC241", "CSC242")


def check(plan: dict, g: nx.DiGraph, doc: Document) -> list[Diagnostic]:
    out = []
    for st in plan["stages"]:
        e, budget = st["estimate"], st["estimate"].get("device_memory_gb")
        if st["kind"] not in CHECKED or budget is None or e["memory_gb"] <= budget:
            continue
        node = g.nodes[st["id"]]["stage"]
        devices, strategy = st["launch"]["devices"], st["launch"]["strategy"]
        floor = estimate.state_floor(st["kind"], n=node.get("_n", 0), n_teacher=node.get("_n_teacher", 0),
                                     devices=devices, precision=st["config"].get("precision", "fp32")) / 1e9
        span = doc.span((*node["_at"], "seq_len"))
        parts = " + ".join(f"{k} {v:,.1f}" for k, v in e["memory"].items() if v)
        training = st["kind"] in estimate.TRAINING
        if not training:
            sharding = "a forward-only stage holds the whole model on every device"
        elif strategy in ("fsdp", "deepspeed"):
            sharding = f"{strategy} over {devices} devices divides weights, grads and optimizer state"
        else:
            sharding = f"strategy {strategy}: every device holds all of them"
        if e["memory"]["teacher"]:
            sharding += "; the teacher is replicated on every device"
        note = f"GB per device: {parts} = {e['memory_gb']:,.1f} ({sharding})"
        if floor > budget:
            held = ["weights", *(["gradients", "optimizer state"] if training else []),
                    *(["teacher weights"] if node.get("_n_teacher") else [])]
            what = ", ".join(held[:-1]) + " and " + held[-1] if len(held) > 1 else held[0]
            out.append(Diagnostic(
                code="CSC241", path=doc.path, span=span, notes=(note,),
                message=f"'{st['id']}' cannot fit: its {what} alone need {floor:,.1f} GB per device even spread "
                        f"over {_devices(devices)}, more than the {budget:g} GB budget",
                help=(f"raise `resources.devices` to at least {_at_least(floor * devices, budget)} (with `strategy: "
                      "fsdp`), or use a smaller model or teacher") if training else
                     "this stage holds the whole model on each device: use a smaller model, or a device with more "
                     "memory (`hardware.device`, `resources.memory_gb`)"))
        else:
            out.append(Diagnostic(
                code="CSC242", path=doc.path, span=span, severity="warning", notes=(note,),
                message=f"'{st['id']}' may not fit: about {e['memory_gb']:,.1f} GB per device, "
                        f"more than the {budget:g} GB budget",
                help=_advice(st, e) + "; or set `resources.memory_gb` if the device has more memory"))
    return out


def _devices(n: int) -> str:
    return "its one device" if n == 1 else f"all {n} devices"


def _at_least(total_gb: float, budget: float) -> int:
    return int(-(-total_gb // budget))


def _advice(st: dict, e: dict) -> str:
    """The change that shrinks the largest part of the estimate."""
    m, cfg, launch = e["memory"], st["config"], st["launch"]
    largest = max(m, key=m.get)
    if largest == "activations" and cfg.get("activation_checkpointing") is False:
        return "set `resources.activation_checkpointing: true` (keeps one layer's activations, not every layer's)"
    if largest == "activations":
        return ("activations grow with `batch.micro` x `seq_len` and are not sharded: lower `batch.micro` or "
                "`seq_len` (the runtime has no context parallelism)")
    if largest in ("weights", "grads", "optimizer") and launch["strategy"] not in ("fsdp", "deepspeed"):
        return "set `resources.strategy: fsdp` to shard weights, gradients and optimizer state over the devices"
    if largest in ("weights", "grads", "optimizer") and st["kind"] in estimate.TRAINING:
        return "raise `resources.devices` (fsdp divides weights, gradients and optimizer state by them)"
    if largest == "weights":
        return "the whole model must fit one device here: use a device with more memory (`hardware.device`)"
    if largest == "teacher":
        return ("the teacher is replicated on every device: cache its top-k logits once (`loss.top_k`, when "
                "several stages share it) or pick a smaller teacher")
    return "lower `loss.chunk_tokens` (the loss's [chunk x vocab] buffers)"
