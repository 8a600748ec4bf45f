"""`cascadec graph`: the family drawn from a plan, as Mermaid, Graphviz DOT or a terminal tree.

Reads only the plan dict (a saved plan draws the same as a fresh one). What is drawn:

    models  (parent, teachers, judges; a bootstrapped model is its bootstrap stage)
    data    (every named source a stage reads)
    stages  in one group per child (its calibrate, prune, phases, variants, control, eval, export);
            shared stages (teacher-logits caches, the root's eval, the report) stand outside
    edges   from each stage input: "teaches" (teacher or cached teacher logits), "judges"
            (a judge model), dotted data reads, and plain edges for checkpoints and statistics

The Mermaid and DOT views draw every stage; the ASCII view (`ascii`) is the cascade as a tree
for a terminal: who is cut from whom, each phase and variant, who teaches whom.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .text import children, groups, si

@dataclass(frozen=True)
class Edge:
    src: str  # node id: a stage id, `model:<name>` or `data:<name>`
    dst: str
    kind: str  # "flow" | "teaches" | "judges" | "reads"


def _node_of_stage(stage_id: str) -> str:
    kind, _, rest = stage_id.partition("/")
    return f"model:{rest}" if kind == "bootstrap" else stage_id


def _edge_kind(role: str) -> str:
    if role in ("teacher", "teacher_logits"):
        return "teaches"
    if role.startswith("judge:"):
        return "judges"
    return "reads" if role in ("data", "tokens") else "flow"


def edges(plan: dict) -> list[Edge]:
    """One edge per stage input, in plan order."""
    out = []
    for s in plan["stages"]:
        dst = _node_of_stage(s["id"])
        for i in s["inputs"]:
            if "stage" in i:
                src = _node_of_stage(i["stage"])
            elif "model" in i:
                src = f"model:{i['model']}"
            else:
                src = f"data:{i['data']}"
            out.append(Edge(src, dst, _edge_kind(i["role"])))
    return out


def _models(plan: dict) -> dict[str, str]:
    """model node id -> label, for every model that is not a child."""
    return {f"model:{n}": f"{n} · {m['role']} · {si(m['params'])}"
            for n, m in plan["models"].items() if m["role"] != "child"}


def _data(plan: dict, es: list[Edge]) -> list[str]:
    used = {e.src for e in es if e.src.startswith("data:")}
    return [f"data:{n}" for n in plan.get("data", {}) if f"data:{n}" in used]


def _groups(plan: dict) -> tuple[dict[str, list[dict]], list[dict]]:
    """`text.groups` less the bootstrap stages (they are drawn as their models)."""
    by_child, shared = groups(plan)
    return by_child, [s for s in shared if s["kind"] != "bootstrap"]


# -- Mermaid ------------------------------------------------------------------------------------

MERMAID_EDGE = {"flow": "-->", "teaches": "==>|teaches|", "judges": "-.->|judges|", "reads": "-.->"}


def mermaid(plan: dict) -> str:
    es = edges(plan)
    ids: dict[str, str] = {}

    def nid(node: str) -> str:
        """A readable Mermaid id: `model:qwen3-8b` -> `model_qwen3_8b` (numbered if two collide)."""
        if node not in ids:
            base = re.sub(r"[^A-Za-z0-9]", "_", node)
            taken = set(ids.values())
            ids[node] = next(c for c in (base, *(f"{base}_{k}" for k in range(2, len(ids) + 3))) if c not in taken)
        return ids[node]

    out = ["flowchart TD"]
    for node, label in _models(plan).items():
        out.append(f'  {nid(node)}[["{label}"]]')
    for node in _data(plan, es):
        out.append(f'  {nid(node)}[("{node.split(":", 1)[1]}")]')
    groups, shared = _groups(plan)
    for child, stages in groups.items():
        out.append(f'  subgraph {nid("child:" + child)}["{child} · {si(plan["models"][child]["params"])}"]')
        out += [f'    {nid(s["id"])}["{s["id"]}"]' for s in stages]
        out.append("  end")
    out += [f'  {nid(s["id"])}["{s["id"]}"]' for s in shared]
    out += [f"  {nid(e.src)} {MERMAID_EDGE[e.kind]} {nid(e.dst)}" for e in es]
    out += ["  classDef model fill:#fde68a,stroke:#b45309", "  classDef data fill:#e0f2fe,stroke:#0369a1"]
    for cls, prefix in (("model", "model:"), ("data", "data:")):
        members = [v for k, v in ids.items() if k.startswith(prefix)]
        if members:
            out.append(f"  class {','.join(members)} {cls}")
    return "\n".join(out) + "\n"


# -- DOT ----------------------------------------------------------------------------------------

DOT_EDGE = {"flow": "", "teaches": ' [label="teaches", style=bold, color="#b45309"]',
            "judges": ' [label="judges", style=dashed]', "reads": " [style=dotted]"}


def dot(plan: dict) -> str:
    es = edges(plan)
    out = ["digraph plan {", "  rankdir=TB;", "  node [shape=box, fontname=monospace];"]
    for node, label in _models(plan).items():
        out.append(f'  "{node}" [label="{label}", shape=box3d, style=filled, fillcolor="#fde68a"];')
    for node in _data(plan, es):
        out.append(f'  "{node}" [label="{node.split(":", 1)[1]}", shape=cylinder, style=filled, fillcolor="#e0f2fe"];')
    groups, shared = _groups(plan)
    for i, (child, stages) in enumerate(groups.items()):
        out.append(f"  subgraph cluster_{i} {{")
        out.append(f'    label="{child} · {si(plan["models"][child]["params"])}";')
        out += [f'    "{s["id"]}" [label="{s["id"]}\\n{s["kind"]}"];' for s in stages]
        out.append("  }")
    out += [f'  "{s["id"]}" [label="{s["id"]}\\n{s["kind"]}"];' for s in shared]
    out += [f'  "{e.src}" -> "{e.dst}"{DOT_EDGE[e.kind]};' for e in es]
    return "\n".join(out + ["}"]) + "\n"


# -- ASCII (the cascade as a tree) -----------------------------------------------------------------


def checkpoint(stage_id: str) -> str:
    """The checkpoint a stage writes, as specs name it: `distill/c/short` -> `c/short`,
    `prune/c` -> `c/pruned`, `control/c/equal-tokens` -> `c/control/equal-tokens`, `bootstrap/m` -> `m`."""
    kind, _, rest = stage_id.partition("/")
    if kind == "control":
        child, _, basis = rest.partition("/")
        return f"{child}/control/{basis}"
    return {"prune": f"{rest}/pruned"}.get(kind, rest)


def _teacher(stage: dict, by_id: dict) -> str | None:
    for i in stage["inputs"]:
        if i["role"] == "teacher":
            return i.get("model") or checkpoint(i["stage"])
        if i["role"] == "teacher_logits":
            cache = by_id[i["stage"]]
            return f"{_teacher(cache, by_id)} (cached top-{cache['config']['top_k']} logits)"
    return None


def _data_of(stage: dict) -> str:
    named = ((stage.get("config") or {}).get("data") or {}).get("name")  # also when read as tokens
    return named or next((i["data"] for i in stage["inputs"] if i["role"] == "data"), "-")


def _cut(prune: dict) -> str:
    src, dst = prune["config"]["source_shape"], prune["config"]["target"]
    moved = [f"{a} {src[a]} -> {dst[a]}" for a in ("layers", "hidden", "ffn", "heads", "kv_heads") if src[a] != dst[a]]
    if dst.get("tied_embeddings") and not src.get("tied_embeddings"):
        moved.append("ties embeddings")
    return ", ".join(moved) or "keeps the shape"


def _step(stage: dict, by_id: dict, first: bool) -> str:
    """`sft (from long, taught by X)`, `grpo-stem (rewards: math, code)`, `odpo (judge: pwrm)`."""
    name = stage["id"].rsplit("/", 1)[1]
    notes = []
    if first:
        start = next(i for i in stage["inputs"] if i["role"] in ("student", "policy"))
        notes.append(f"from {checkpoint(start['stage']).split('/', 1)[1] if 'stage' in start else start['model']}")
    if stage["kind"] != name:
        notes.append(stage["kind"])
    teacher = _teacher(stage, by_id)
    if teacher:
        notes.append(f"taught by {teacher}")
    judges = list(stage["config"].get("judges", {}))
    if judges:
        notes.append(f"{'judge' if stage['kind'] == 'odpo' else 'rewards'}: {', '.join(judges)}")
    return f"{name} ({', '.join(notes)})" if notes else name


def ascii_tree(plan: dict) -> str:
    by_id = {s["id"]: s for s in plan["stages"]}
    kids = children(plan)
    groups, _ = _groups(plan)
    source = {c: plan["models"][c]["prune_from"] for c in kids}
    under: dict[str, list[str]] = {}  # model or child -> children cut from it (or from its checkpoints)
    for c in kids:
        under.setdefault(source[c].split("/")[0], []).append(c)
    roots = [m for m in plan["models"] if plan["models"][m]["role"] != "child" and m in under]

    def paths(node: str) -> list[list[str]]:
        return [[node, *p] for c in under.get(node, []) for p in paths(c)] or [[node]]

    out = [f"family '{plan['family']}': " + ("; ".join(" -> ".join(p) for r in roots for p in paths(r)) or "no children"), ""]

    def child_lines(c: str, pad: str) -> list[str]:
        stages = groups[c]
        phases = [s for s in stages if s["kind"] == "distill"]
        variants: dict[str, list[dict]] = {}
        for s in stages:
            if s["id"].count("/") == 3:
                variants.setdefault(s["id"].split("/")[2], []).append(s)
        width = max([len(s["id"].rsplit("/", 1)[1]) for s in phases] + [len(v) for v in variants], default=0)
        rows = [f"{s['id'].rsplit('/', 1)[1]:<{width}}  {si(s['config']['tokens'])} tokens at seq "
                f"{s['config']['seq_len']:,}, taught by {_teacher(s, by_id)}, data {_data_of(s)}" for s in phases]
        rows += [f"{v:<{width}}  " + " -> ".join(_step(s, by_id, k == 0) for k, s in enumerate(steps))
                 for v, steps in sorted(variants.items())]
        extras = [f"control ({s['id'].rsplit('/', 1)[1]}, {si(s['config']['tokens'])} tokens)" if s["kind"] == "control"
                  else s["kind"] for s in stages if s["kind"] in ("control", "eval", "export")]
        if extras:
            rows.append(" + ".join(extras))
        lines = []
        items = rows + under.get(c, [])
        for k, item in enumerate(items):
            last = k == len(items) - 1
            branch, cont = ("`-- ", "    ") if last else ("|-- ", "|   ")
            if item in source:
                lines += node_lines(item, pad, branch, cont)
            else:
                lines.append(f"{pad}{branch}{item}")
        return lines

    def node_lines(c: str, pad: str, branch: str, cont: str) -> list[str]:
        m = plan["models"][c]
        prune = by_id.get(f"prune/{c}")
        cut = f": cut from {source[c]} ({_cut(prune)})" if prune else ""
        return [f"{pad}{branch}{c} ({si(m['params'])}){cut}"] + child_lines(c, pad + cont)

    for r in roots:
        m = plan["models"][r]
        out.append(f"{r} ({m['role']}, {si(m['params'])})")
        kids_of_root = under.get(r, [])
        for k, c in enumerate(kids_of_root):
            last = k == len(kids_of_root) - 1
            out += node_lines(c, "", "`-- " if last else "|-- ", "    " if last else "|   ")
        out.append("")
    out += _teaches(plan, by_id)
    return "\n".join(out).rstrip("\n") + "\n"


def _teaches(plan: dict, by_id: dict) -> list[str]:
    """`teaches:` — each teacher and the checkpoints it teaches, grouped per child; then judges
    and data sources with what reads them."""
    taught: dict[str, dict[str, list[str]]] = {}
    for s in plan["stages"]:
        if s["kind"] == "teacher-logits":
            continue
        teacher = _teacher(s, by_id)
        if teacher:
            child, _, cp = checkpoint(s["id"]).partition("/")
            taught.setdefault(teacher.split(" (")[0], {}).setdefault(child, []).append(cp)
    order = {c: k for k, c in enumerate(children(plan))}
    taught = {t: dict(sorted(pc.items(), key=lambda kv: order.get(kv[0], -1))) for t, pc in taught.items()}
    out = ["teaches:"] if taught else []
    width = max((len(t) for t in taught), default=0)
    for t, per_child in taught.items():
        out.append(f"  {t:<{width}}  => " + ", ".join(f"{c} ({', '.join(cps)})" for c, cps in per_child.items()))
    judged: dict[str, list[str]] = {}
    for s in plan["stages"]:
        for j in s["config"].get("judges", {}) if s["kind"] in ("odpo", "grpo") else ():
            judged.setdefault(j, [])
            child = checkpoint(s["id"]).split("/")[0]
            if child not in judged[j]:
                judged[j].append(child)
    for cs in judged.values():
        cs.sort(key=lambda c: order.get(c, -1))
    if judged:
        width = max(len(j) for j in judged)
        out += ["judges:"] + [f"  {j:<{width}}  -> {', '.join(cs)}" for j, cs in judged.items()]
    reads: dict[str, list[str]] = {}
    for s in plan["stages"]:
        for i in s["inputs"]:
            if s["kind"] == "tokenize":
                continue
            data = i.get("data") or (by_id[i["stage"]]["config"]["data"]["name"]
                                     if "stage" in i and by_id[i["stage"]]["kind"] == "tokenize" else None)
            if data and s["kind"] not in reads.setdefault(data, []):
                reads[data].append(s["kind"])
    if reads:
        width = max(len(d) for d in reads)
        out += ["data:"] + [f"  {d:<{width}}  -> {', '.join(ks)}" for d, ks in reads.items()]
    return out
