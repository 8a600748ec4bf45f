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
    out.append("")
    rows = [("stage", "kind", "tokens", "steps", "FLOPs", "device-h", "mem/dev")]
    for s in plan["stages"]:
        e = s["estimate"]
        rows.append((s["id"], s["kind"], si(e["tokens"]) if e["tokens"] else "-", str(e["steps"] or "-"),
                     si(e["flops"]) if e["flops"] else "-", f"{e['device_hours']:,.2f}" if e["flops"] else "-",
                     _gb(e["memory_gb"])))
    out += _grid(rows, right=(2, 3, 4, 5, 6))
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


def _gb(gb: float) -> str:
    if not gb:
        return "-"
    return f"{gb:,.1f}G" if gb >= 0.1 else "<0.1G"


def _grid(rows, right=()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines
