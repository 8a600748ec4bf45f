"""`export` stage: copy a child's final checkpoints (base and each variant) into one place.

Each export is a complete Hugging Face directory (weights, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads with no cascadec installed.
"""

from __future__ import annotations

import shutil

from ..context import StageContext

ROLE = "checkpoint:"


def run(ctx: StageContext) -> dict:
    names = ctx.config["names"]
    roles = [r for r in ctx.stage["inputs"] if r["role"].startswith(ROLE)]
    exported = {}
    for name, inp in zip(names, roles):
        src = ctx.inputs[inp["role"]]
        shutil.copytree(src, ctx.out / name)
        exported[name] = sum(f.stat().st_size for f in (ctx.out / name).rglob("*") if f.is_file())
        ctx.log(f"export {name}: {exported[name] / 1e6:.1f} MB")
    return {"exported_bytes": exported}
