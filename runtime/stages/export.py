"""`export` stage: copy a child's final checkpoints (base and each variant) into one place.

Each export is a complete Hugging Face directory (weights, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads with no cascadec installed, with a model card
(`README.md`, the hub's format: YAML metadata, then Markdown) that says what the checkpoint is:
its family, the model it was cut from, every step that made it (planned tokens and teachers),
and its results from the child's eval stage when the plan has one.
"""

from __future__ import annotations

import json
import shutil

from ..context import StageContext
from ..report import context_cell

ROLE = "checkpoint:"


def run(ctx: StageContext) -> dict:
    names = ctx.config["names"]
    refs = ctx.config.get("checkpoints") or names
    roles = [r for r in ctx.stage["inputs"] if r["role"].startswith(ROLE)]
    results = _results(ctx)
    exported = {}
    for name, ref, inp in zip(names, refs, roles):
        src = ctx.inputs[inp["role"]]
        shutil.copytree(src, ctx.out / name)
        if ctx.config.get("card"):
            (ctx.out / name / "README.md").write_text(card(ctx.config["card"], name, ref, results))
        exported[name] = sum(f.stat().st_size for f in (ctx.out / name).rglob("*") if f.is_file())
        ctx.log(f"export {name}: {exported[name] / 1e6:.1f} MB")
    return {"exported_bytes": exported}


def _results(ctx: StageContext) -> dict:
    path = ctx.inputs.get("eval")
    return json.loads(path.read_text()).get("checkpoints", {}) if path is not None else {}


def card(info: dict, name: str, ref: str, results: dict) -> str:
    """The model card of checkpoint ``ref`` (exported as ``name``)."""
    tags = ["cascadec", "pruning", "distillation", info["family"]]
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", *[f"- {t}" for t in tags], "---", ""]
    source = info.get("root_source") or {}
    origin = source.get("hub") or source.get("path") or ("trained from scratch by the plan" if "bootstrap" in source else "")
    lines = [f"# {info['family']} / {ref}", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    lines += [f"A {info['params']:,}-parameter member of the **{info['family']}** family, made by cascade "
              f"distillation with cascadec from **{info['root']}**{f' ({origin})' if origin else ''}: pruned, "
              "then distilled with a larger model as teacher.", "", "## How it was made", ""]
    lines += [f"{i}. `{s['stage']}`: {s['what']}" for i, s in enumerate(info["steps"], 1)]
    if results:
        tasks = sorted({t for r in results.values() for t in (r.get("harness") or {})})
        lengths = sorted({int(n) for r in results.values() for n in (r.get("contexts") or {})})
        losses = [f"held-out loss at {n:,} tokens" for n in lengths] or ["held-out loss"]
        lines += ["", "## Results", "", "Held-out loss is mean next-token cross-entropy (nats/token) on the "
                  "family's held-out data; every checkpoint of the child is scored on the same tokens"
                  + (" (at each context length; † marks a length longer than the checkpoint was trained on)" if lengths else "")
                  + ".", "",
                  "| " + " | ".join(["checkpoint", *losses, *tasks]) + " |",
                  "| " + " | ".join(["---", *("---:" for _ in losses), *("---:" for _ in tasks)]) + " |"]
        for ckpt, r in results.items():
            cells = []
            for t in tasks:
                metrics = (r.get("harness") or {}).get(t) or {}
                cells.append(", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or "–")
            mark = " (this model)" if ckpt == ref else ""
            scores = [context_cell((r.get("contexts") or {}).get(str(n))) for n in lengths] or [f"{r['loss']:.4f}"]
            lines.append("| " + " | ".join([f"{ckpt}{mark}", *scores, *cells]) + " |")
    lines += ["", "Load it with `transformers.AutoModelForCausalLM.from_pretrained(PATH)`; nothing from cascadec is "
              "needed.", ""]
    return "\n".join(meta + lines)
