"""Pass 5 — graph: a checked FamilySpec -> the stage DAG (networkx), one node per stage.

    bootstrap/parent ─▶ calibrate/c1 ─▶ prune/c1 ─▶ distill/c1/short ─▶ distill/c1/long ─▶ sft/c1/instruct/sft …
                                                          │
                                                          └─▶ calibrate/c2 ─▶ prune/c2 ─▶ …   (prune_from: c1/short)
    teachers, calibration sources and starting checkpoints are edges too; eval/<child> and
    export/<child> hang off a child's final checkpoints; report/<family> collects every eval.

Each node's `stage` attribute holds id, kind, inputs, outputs, config, launch and provenance;
`plan` adds hashes and estimates. Pure.
"""

from __future__ import annotations

import networkx as nx

from . import resolve
from .shapes import param_count
from .spec import ChildSpec, FamilySpec, Training

TRAINING_GROUPS = ("optimizer", "schedule", "batch", "checkpoint")


def _path(stage: str, name: str) -> str:
    return f"stages/{stage}/{name}"


def _ckpt_input(role: str, ref: str, cps: dict) -> dict:
    cp = cps[ref]
    if cp.stage is None:
        return {"role": role, "model": cp.model}
    return {"role": role, "stage": cp.stage, "path": _path(cp.stage, "model")}


def _prov(settings, groups, prefix="config") -> dict:
    return {f"{prefix}.{k}": v for k, v in settings.provenance.items()
            if k.split(".")[0] in groups or k in groups}


def _training_config(t: Training, spec: FamilySpec, steps: int, offset: int) -> tuple[dict, dict]:
    s = t.settings
    warmup = s["schedule.warmup_steps"]
    prov = _prov(s, (*TRAINING_GROUPS, "seed"))
    prov["config.precision"] = s.provenance["resources.precision"]
    if warmup is None:
        warmup = min(100, steps // 10)
        prov["config.schedule.warmup_steps"] = "default: min(100, steps // 10)"
    config = {
        "seq_len": t.seq_len,
        "global_batch": s["batch.global"],
        "micro_batch": s["batch.micro"],
        "steps": steps,
        "data": {"name": t.data, "offset": offset, "shuffle": spec.data[t.data].shuffle},
        "optimizer": {k: v for k, v in s.group("optimizer").items()},
        "schedule": {"kind": s["schedule.kind"], "warmup_steps": warmup},
        "checkpoint": s.group("checkpoint"),
        "seed": s["seed"],
        "precision": s["resources.precision"],
    }
    return config, prov


def _launch(settings) -> tuple[dict, dict]:
    r = settings.group("resources")
    launch = {k: r[k] for k in ("devices", "nodes", "launcher", "strategy")}
    return launch, {f"launch.{k}": settings.provenance[f"resources.{k}"] for k in launch}


def build(spec: FamilySpec) -> nx.DiGraph:
    g = nx.DiGraph()
    cps = resolve.checkpoints(spec)
    shapes = resolve.shapes(spec, cps)
    offsets: dict[str, int] = {}

    def window(data: str, tokens: int) -> int:
        """Offset of the next window of a streamed source; 0 for a source every stage rereads."""
        if not spec.data[data].stream:
            return 0
        start = offsets.get(data, 0)
        offsets[data] = start + tokens
        return start

    def add(stage: dict, needs=()):
        g.add_node(stage["id"], stage=stage)
        for inp in stage["inputs"]:
            if "stage" in inp:
                g.add_edge(inp["stage"], stage["id"])
        for n in needs:
            g.add_edge(n, stage["id"])

    def owner_shape(ref: str):
        cp = cps[ref]
        return shapes[cp.model or cp.child]

    # -- bootstrapped models ---------------------------------------------------------------
    for m in spec.models.values():
        if m.bootstrap is None:
            continue
        t = m.bootstrap
        n = resolve.steps(t, spec)
        config, prov = _training_config(t, spec, n, window(t.data, n * t.seq_len * t.settings["batch.global"]))
        config["shape"] = m.arch.axes()
        config["tokenizer"] = {"vocab_size": m.arch.vocab}
        config["tokens"] = n * t.seq_len * config["global_batch"]
        launch, lprov = _launch(t.settings)
        sid = resolve.stage_id("bootstrap", m.name)
        add({"id": sid, "kind": "bootstrap", "inputs": [{"role": "data", "data": t.data}],
             "outputs": [_path(sid, "model")], "config": config, "launch": launch,
             "provenance": {**prov, **lprov}, "_n": param_count(m.arch)})

    # -- teacher-logits caches: several stages, one teacher, one data window -----------------
    plans = []  # (child, variant, training, ref, steps, offset)
    for c, variant, t, ref in resolve.trainings(spec):
        n = resolve.steps(t, spec) or 0
        tokens = n * t.seq_len * t.settings["batch.global"] if t.kind not in ("odpo", "grpo") else 0
        plans.append((c, variant, t, ref, n, window(t.data, tokens) if tokens else 0))
    groups: dict = {}
    for c, variant, t, ref, n, offset in plans:
        top_k = t.settings["loss.top_k"]
        if t.teacher is not None and top_k is not None and t.kind in ("distill", "sft"):
            teacher = resolve.lookup(t.teacher, cps, c).ref
            groups.setdefault((teacher, t.data, offset, t.seq_len, top_k), []).append(ref)
    cache_of = {}
    for (teacher, data, offset, seq_len, top_k), users in sorted(groups.items()):
        if len(users) < 2:
            continue
        sid = resolve.stage_id("teacher-logits", teacher.replace("/", "."), data + (f"@{offset}" if offset else ""))
        cache_of.update({u: sid for u in users})
        tokens = max(n * t.seq_len * t.settings["batch.global"] for c, v, t, ref, n, o in plans if ref in users)
        first = next(t for c, v, t, ref, n, o in plans if ref in users)
        launch, lprov = _launch(first.settings)
        add({"id": sid, "kind": "teacher-logits",
             "inputs": [_ckpt_input("teacher", teacher, cps), {"role": "data", "data": data}],
             "outputs": [_path(sid, "logits")],
             "config": {"seq_len": seq_len, "tokens": tokens, "data": {"name": data, "offset": offset},
                        "top_k": top_k, "micro_batch": first.settings["batch.micro"],
                        "precision": first.settings["resources.precision"], "users": sorted(users)},
             "launch": launch, "provenance": lprov, "_n": param_count(owner_shape(teacher)), "_teacher": True})

    by_child: dict[str, list] = {}
    for entry in plans:
        by_child.setdefault(entry[0].name, []).append(entry)

    # -- per child ---------------------------------------------------------------------------
    for c in spec.children:
        src = resolve.lookup(c.prune_from, cps)
        source_shape, target = owner_shape(src.ref), shapes[c.name]
        cal = c.calibration
        shrinks = [a for a in ("layers", "hidden", "ffn", "heads", "kv_heads") if getattr(target, a) < getattr(source_shape, a)]
        methods = {
            "layers": c.methods.get("layers", "norm_ratio") if "layers" in shrinks else None,
            "hidden": c.methods.get("hidden", "pca") if "hidden" in shrinks else None,
            "ffn": c.methods.get("ffn", "activation") if "ffn" in shrinks else None,
            "heads": c.methods.get("heads", "none") if {"heads", "kv_heads"} & set(shrinks) else None,
        }
        launch, lprov = _launch(c.calibration)
        prune_inputs = [_ckpt_input("model", src.ref, cps)]
        if shrinks:
            scores = {"norm_ratio": ["norm_ratio"], "block_influence": ["block_influence"], "angular": ["angular"],
                      None: []}[methods["layers"]]
            scores += {"pca": ["hidden_pca"], "channel": ["hidden_channel"], None: []}[methods["hidden"]]
            scores += ["ffn_activation"] if methods["ffn"] else []
            scores += ["heads"] if methods["heads"] not in (None, "none") else []
            sid = resolve.stage_id("calibrate", c.name)
            samples, seq_len = cal["calibration.samples"], cal["calibration.seq_len"]
            add({"id": sid, "kind": "calibrate",
                 "inputs": [_ckpt_input("model", src.ref, cps), {"role": "data", "data": cal["calibration.data"]}],
                 "outputs": [_path(sid, "stats.safetensors"), _path(sid, "summary.json")],
                 "config": {"samples": samples, "seq_len": seq_len, "batch_size": cal["calibration.batch_size"],
                            "data": {"name": cal["calibration.data"], "offset": 0}, "seed": cal["seed"],
                            "scores": scores,
                            "angular_block": source_shape.layers - target.layers if methods["layers"] == "angular" else None,
                            "precision": cal["resources.precision"]},
                 "launch": launch, "provenance": {**_prov(cal, ("calibration", "seed")), **lprov},
                 "_n": param_count(source_shape), "_tokens": samples * seq_len})
            prune_inputs.append({"role": "stats", "stage": sid, "path": _path(sid, "stats.safetensors")})
        sid = resolve.stage_id("prune", c.name)
        add({"id": sid, "kind": "prune", "inputs": prune_inputs, "outputs": [_path(sid, "model")],
             "config": {"source_shape": source_shape.axes(), "target": target.axes(), "methods": methods,
                        "tie_embeddings": target.tied_embeddings and not source_shape.tied_embeddings},
             "launch": {**launch, "devices": 1, "launcher": "local", "strategy": "none"},
             "provenance": {f"config.methods.{a}": ("spec:" if a in c.methods else "default") for a, m in methods.items() if m},
             "_n": param_count(target)})

        starts = resolve.starts(c)
        for cc, variant, t, ref, n, offset in by_child.get(c.name, ()):
            sid = cps[ref].stage
            config, prov = _training_config(t, spec, n, offset)
            inputs = [_ckpt_input("student" if t.kind in ("distill", "sft") else "policy",
                                  resolve.lookup(starts[ref], cps, c).ref, cps),
                      {"role": "data", "data": t.data}]
            n_teacher = 0
            if t.teacher is not None:
                teacher = resolve.lookup(t.teacher, cps, c).ref
                n_teacher = param_count(owner_shape(teacher))
                if ref in cache_of:
                    inputs.append({"role": "teacher_logits", "stage": cache_of[ref], "path": _path(cache_of[ref], "logits")})
                else:
                    inputs.append(_ckpt_input("teacher", teacher, cps))
            if t.kind in ("distill", "sft"):
                config["loss"] = {**t.settings.group("loss"), "teacher": t.teacher is not None}
                prov.update(_prov(t.settings, ("loss",)))
            if t.kind == "distill":
                config["phase"] = t.name
                rope = t.options.get("rope")
                config["rope"] = None if rope is None else {
                    "rope_parameters": rope,
                    "max_position_embeddings": t.options.get("max_position_embeddings", t.seq_len)}
            if t.kind == "sft":
                config["assistant_only"] = t.options.get("assistant_only", True)
            if t.kind in ("dpo", "odpo", "grpo"):
                config["beta"] = t.options.get("beta", 0.0 if t.kind == "grpo" else 0.1)
                prov["config.beta"] = "spec" if "beta" in t.options else "default"
            if t.kind in ("odpo", "grpo"):
                config["prompts"] = n * t.settings["batch.global"]
                config["generation"] = t.settings.group("generation")
                prov.update(_prov(t.settings, ("generation",)))
                judges = [t.options["judge"]] if "judge" in t.options else list(t.options.get("rewards", []))
                config["judges"] = {j: {"kind": spec.judges[j].kind, **spec.judges[j].options} for j in judges}
                for j in judges:
                    if spec.judges[j].model is not None:
                        inputs.append(_ckpt_input(f"judge:{j}", resolve.lookup(spec.judges[j].model, cps).ref, cps))
                if t.kind == "odpo":
                    config["strip_thinking"] = t.options.get("strip_thinking", False)
                else:
                    clip = t.options.get("clip", {})
                    config["clip"] = {"low": clip.get("low", 0.2), "high": clip.get("high", 0.28)}
                    prov["config.clip"] = "spec" if clip else "default: Magistral's clip-higher (0.2, 0.28)"
            else:
                config["tokens"] = n * t.seq_len * config["global_batch"]
            launch, lprov = _launch(t.settings)
            add({"id": sid, "kind": t.kind, "inputs": inputs, "outputs": [_path(sid, "model")],
                 "config": config, "launch": launch, "provenance": {**prov, **lprov},
                 "_n": param_count(target), "_n_teacher": 0 if ref in cache_of else n_teacher})

        finals = [f"{c.name}/{c.phases[-1].name}"] + [f"{c.name}/{v}/{steps[-1].name}" for v, steps in c.variants]
        if c.control:
            first = c.phases[0]
            distill_tokens = sum(g.nodes[cps[f"{c.name}/{p.name}"].stage]["stage"]["config"]["tokens"] for p in c.phases)
            per_step = first.seq_len * first.settings["batch.global"]
            n = distill_tokens // per_step
            config, prov = _training_config(first, spec, n, g.nodes[cps[f"{c.name}/{first.name}"].stage]["stage"]["config"]["data"]["offset"])
            config.update(shape=target.axes(), tokens=n * per_step)
            launch, lprov = _launch(first.settings)
            sid = resolve.stage_id("control", c.name)
            root = src
            while root.child is not None:
                root = resolve.lookup(next(x for x in spec.children if x.name == root.child).prune_from, cps)
            add({"id": sid, "kind": "control",
                 "inputs": [_ckpt_input("template", root.ref, cps), {"role": "data", "data": first.data}],
                 "outputs": [_path(sid, "model")], "config": config, "launch": launch,
                 "provenance": {**prov, **lprov, "config.tokens": "same tokens as the child's distillation phases"},
                 "_n": param_count(target)})
        if spec.eval is not None:
            names = [f"{c.name}/pruned"] + [f"{c.name}/{p.name}" for p in c.phases] + \
                [f"{c.name}/{v}/{s.name}" for v, steps in c.variants for s in steps] + \
                ([f"{c.name}/control"] if c.control else [])
            add(_eval_stage(spec, c.name, names, cps, param_count(target)))
        if c.export:
            sid = resolve.stage_id("export", c.name)
            add({"id": sid, "kind": "export", "inputs": [_ckpt_input(f"checkpoint:{f}", f, cps) for f in finals],
                 "outputs": [_path(sid, f.split("/", 1)[1].replace("/", "-")) for f in finals],
                 "config": {"names": [f.split("/", 1)[1].replace("/", "-") for f in finals]},
                 "launch": {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "none"},
                 "provenance": {}, "_n": 0})

    if spec.eval is not None:
        roots = sorted({cps[c.prune_from].model for c in spec.children
                        if c.prune_from in cps and cps[c.prune_from].model is not None})
        evals = [n for n in g.nodes if n.startswith("eval/")]
        for m in roots:
            add(_eval_stage(spec, m, [m], cps, param_count(shapes[m])))
            evals.append(resolve.stage_id("eval", m))
        sid = resolve.stage_id("report", spec.family)
        add({"id": sid, "kind": "report",
             "inputs": [{"role": f"eval:{e}", "stage": e, "path": _path(e, "eval.json")} for e in sorted(evals)],
             "outputs": [_path(sid, "report.md"), _path(sid, "report.json")],
             "config": {"family": spec.family}, "launch": {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "none"},
             "provenance": {}, "_n": 0})
    return g


def _eval_stage(spec: FamilySpec, owner: str, names: list[str], cps: dict, n_params: int) -> dict:
    sid = resolve.stage_id("eval", owner)
    ev = spec.eval
    return {"id": sid, "kind": "eval",
            "inputs": [_ckpt_input(f"checkpoint:{n}", n, cps) for n in names] + [{"role": "data", "data": ev.data}],
            "outputs": [_path(sid, "eval.json")],
            "config": {"data": {"name": ev.data, "offset": 0}, "tokens": ev.tokens, "seq_len": ev.seq_len,
                       "checkpoints": names},
            "launch": {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "none"},
            "provenance": {}, "_n": n_params, "_tokens": ev.tokens * len(names), "_inference": True}


def check_acyclic(g: nx.DiGraph) -> list[str] | None:
    """A cycle of stage ids, if the DAG has one (e.g. a child taught by its own descendant)."""
    try:
        return [u for u, _ in nx.find_cycle(g)]
    except nx.NetworkXNoCycle:
        return None
