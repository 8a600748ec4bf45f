"""Human renderings of a plan: the Terraform-like stage table (the family drawn is `draw.py`).

Reads only the plan dict (never the spec), so a saved plan renders the same as a fresh one.
"""

from __future__ import annotations


def si(n: float, unit: str = "") -> str:
    """1.2e12 -> '1.20T'; exact below 1000."""
    for div, suffix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _shape(s: dict) -> str:
    tied = "tied" if s["tied_embeddings"] else "untied"
    return f"{s['layers']}L {s['hidden']}h {s['ffn']}f {s['heads']}/{s['kv_heads']}x{s['head_dim']} {tied}"


def table(plan: dict, spec_path: str) -> str:
    out = [f"cascadec plan: family '{plan['family']}' from {spec_path} (spec sha256 {plan['spec_sha256'][:12]})", ""]
    rows = [("model", "role", "shape", "params")]
    for name, m in plan["models"].items():
        rows.append((name, m["role"], _shape(m["shape"]), f"{m['params']:,}"))
    out += _grid(rows, right=(3,))
    out.append(f"shape: {SHAPE_LEGEND}")
    out.append("")
    rows = [("stage", "kind", "tokens", "steps", "FLOPs", "device-h", "mem/dev")]
    by_child, shared = groups(plan)
    sections = [("family-wide stages", shared)] + [
        (f"{c}: {si(plan['models'][c]['params'])} parameters, cut from {plan['models'][c]['prune_from']}", stages)
        for c, stages in by_child.items()]
    for title, stages in sections:
        if stages:
            rows.append((f"# {title}",))
            rows += [_row(s) for s in stages]
    out += _grid(rows, right=(2, 3, 4, 5, 6))
    if any(s["kind"] == "eval" for s in plan["stages"]):
        out.append("eval tokens: N x T = N checkpoints scored, T held-out tokens each (all counted in the FLOPs)"
                   + ("; N x T x C: at each of C context lengths"
                      if any(s["kind"] == "eval" and s["config"].get("contexts") for s in plan["stages"]) else ""))
    t = plan["totals"]
    hw = t["hardware"]
    out += ["", f"totals: {t['stages']} stages, {si(t['tokens'])} training tokens, {si(t['flops'])}FLOPs, "
                f"{t['device_hours']:,.2f} device-hours on {hw['device']} at {hw['mfu']:.0%} MFU of {hw['peak_tflops']:g} TFLOP/s"]
    if "from_scratch" in t:
        fs = t["from_scratch"]
        out.append(f"compute: the cascade costs {fs['cascade_share']:.1%} of training every child from scratch "
                   f"on {si(fs['tokens_per_child'])} tokens ({si(fs['flops'])}FLOPs)")
    if plan["assumed"]:
        out.append(f"assumed: {len(plan['assumed'])} value(s) the sources do not give:")
        out += [f"  ~ {a}" for a in plan["assumed"]]
    return "\n".join(out) + "\n"


SHAPE_LEGEND = "L layers, h hidden, f FFN; 32/8x128 = 32 query heads, 8 KV heads, head_dim 128; tied/untied embeddings"
PER_CHILD = ("calibrate", "prune", "distill", "control", "sft", "dpo", "odpo", "grpo", "eval", "export")


def children(plan: dict) -> list[str]:
    """The cascade's children, in spec order."""
    return [n for n, m in plan["models"].items() if m["role"] == "child"]


def owner(stage: dict, kids) -> str | None:
    """The child a stage belongs to (`distill/<child>/...`), None for family-wide stages
    (bootstrap, teacher-logits caches, the root's eval, the report)."""
    parts = stage["id"].split("/")
    return parts[1] if stage["kind"] in PER_CHILD and len(parts) > 1 and parts[1] in kids else None


def groups(plan: dict) -> tuple[dict[str, list[dict]], list[dict]]:
    """(child -> its stages, family-wide stages), each in plan order."""
    kids = children(plan)
    by_child: dict[str, list[dict]] = {c: [] for c in kids}
    shared = []
    for s in plan["stages"]:
        c = owner(s, by_child)
        (by_child[c] if c else shared).append(s)
    return by_child, shared


def _row(s: dict) -> tuple:
    e = s["estimate"]
    tokens = si(e["tokens"]) if e["tokens"] else "-"
    if s["kind"] == "eval" and e["tokens"]:
        tokens = f"{len(s['config']['checkpoints'])}x{si(s['config']['tokens'])}"
        if s["config"].get("contexts"):  # the same tokens at each context length
            tokens += f"x{len(s['config']['contexts'])}"
    return (s["id"], s["kind"], tokens, str(e["steps"] or "-"),
            si(e["flops"]) if e["flops"] else "-", f"{e['device_hours']:,.2f}" if e["flops"] else "-",
            _gb(e["memory_gb"]))


def _gb(gb: float) -> str:
    if not gb:
        return "-"
    return f"{gb:,.1f}G" if gb >= 0.1 else "<0.1G"


def _grid(rows, right=()) -> list[str]:
    """Aligned columns; a one-cell row is a section title, printed as is after a blank line."""
    cols = [r for r in rows if len(r) > 1]
    widths = [max(len(r[i]) for r in cols) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        if len(r) == 1:
            lines += ["", r[0]] if n > 1 and len(rows[n - 1]) > 1 else [r[0]]
            continue
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines
