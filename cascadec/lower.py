"""Pass 3 — lower: a schema-valid Document -> FamilySpec (typed, units parsed, defaults applied).

Every setting is resolved family -> child -> phase/step, key by key, and its provenance
recorded. References stay as written; `checks` judges them. Pure: no file access (the CLI
reads local `config.json` files and passes them in as `configs`).
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from fractions import Fraction

from . import counts, grpo
from .presets import PRESETS, expand
from .schema import family_schema
from .shapes import Shape, from_hf_config
from .source import Document, where
from .spec import (BUILTIN_TASKS, ChildSpec, DataSpec, EvalSpec, FamilySpec, JudgeSpec, ModelSpec, Settings, Share,
                   ShapeRequest, Training)

# Built-in defaults. Each is a cascadec choice, not a number from a paper; the plan says "default".
DEFAULTS = {
    "resources.devices": 1, "resources.nodes": 1, "resources.launcher": "local",
    "resources.strategy": "none", "resources.precision": "fp32", "resources.memory_gb": None,  # None: hardware.device's
    "resources.activation_checkpointing": False,
    "resources.partition": None, "resources.account": None, "resources.qos": None,  # Slurm: the cluster's defaults
    "resources.max_hours": None,  # None: emit.DEFAULT_MAX_HOURS
    "optimizer.name": "adamw", "optimizer.lr": 1e-4, "optimizer.min_lr": 1e-5,
    "optimizer.betas": [0.9, 0.95], "optimizer.eps": 1e-8, "optimizer.weight_decay": 0.1,
    "optimizer.grad_clip": 1.0,
    "schedule.kind": "cosine", "schedule.warmup_steps": None,  # None: min(100, steps // 10)
    "loss.kind": "forward_kl", "loss.temperature": 1.0, "loss.top_k": None, "loss.ce_weight": 0.0,
    "loss.chunk_tokens": 1024,
    "batch.global": 1024, "batch.micro": 1,
    "checkpoint.every_steps": 1000, "checkpoint.keep": 2,
    "seed": 0,
    "generation.samples": 2, "generation.temperature": 0.7, "generation.top_p": 1.0,
    "generation.max_new_tokens": 1024, "generation.stop": [],
    "calibration.data": None, "calibration.samples": 1024, "calibration.seq_len": 2048,
    "calibration.batch_size": 8,
}
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "b200": 2250.0, "mi300x": 1307.0, "cpu": 1.0}
DEVICE_MEMORY_GB = {"h100": 80, "h200": 141, "a100": 80, "b200": 180, "mi300x": 192, "cpu": None}
HARDWARE_DEFAULTS = {"device": "h100", "peak_tflops": None, "mfu": 0.4}
SETTING_GROUPS = ("resources", "optimizer", "schedule", "loss", "batch", "checkpoint", "generation", "calibration")


def quantity(v) -> int:
    """`3T` -> 3_000_000_000_000, exactly (decimal arithmetic, never float). Schema-valid input
    only: `counts` has already turned `3e12` into an int and refused `1.2345K`."""
    return v if isinstance(v, int) else int(counts.suffixed(v))


def tokens(v) -> int | Share:
    if isinstance(v, str) and v.endswith("%"):
        return Share(Fraction(Decimal(v[:-1])) / 100)
    return quantity(v)


def _unwrap(value, path: tuple, assumed: list):
    """Strip an `{assumed: V, why: ...}` wrapper, recording it; return (value, provenance)."""
    if isinstance(value, dict) and set(value) == {"assumed", "why"}:
        assumed.append((path, value["why"]))
        return value["assumed"], f"assumed:{where(path)}: {value['why']}"
    return value, f"spec:{where(path)}"


def _flatten(block: dict | None, at: tuple, assumed: list, into: dict, prov: dict, origin: dict):
    """Merge a settings block (`optimizer: {lr: ...}`, `seed: 3`) into flat dicts."""
    for group, value in (block or {}).items():
        if group in SETTING_GROUPS and isinstance(value, dict):
            for key, v in value.items():
                into[f"{group}.{key}"], prov[f"{group}.{key}"] = _unwrap(v, (*at, group, key), assumed)
                origin[f"{group}.{key}"] = (*at, group, key)
        elif group == "seed":
            into["seed"], prov["seed"] = _unwrap(value, (*at, "seed"), assumed)
            origin["seed"] = (*at, "seed")


def _inherit(parent: Settings, block: dict | None, at: tuple, assumed: list) -> Settings:
    values, origin = dict(parent.values), dict(parent.at)
    prov = {k: (p if p == "default" else p.replace("spec:", "inherited:", 1)) for k, p in parent.provenance.items()}
    _flatten(block, at, assumed, values, prov, origin)
    return Settings(values=values, provenance=prov, at=origin)


def _training(raw: dict, kind: str, at: tuple, inherited: Settings, assumed: list) -> Training:
    settings = _inherit(inherited, raw, at, assumed)
    options = {}
    for key in ("rope", "max_position_embeddings", "assistant_only", "judge", "rewards", "clip",
                "strip_thinking", "win_rate", *grpo.STEP_KEYS):
        if key in raw:
            options[key] = raw[key]
    for key, (setting, _) in grpo.ALIASES.items():  # TRL's names for two generation settings
        if key in raw:
            settings.values[setting], settings.provenance[setting] = raw[key], f"spec:{where((*at, key))}"
            settings.at[setting] = (*at, key)
    if "beta" in raw:
        options["beta"], _ = _unwrap(raw["beta"], (*at, "beta"), assumed)
    budget = raw.get("tokens")
    if isinstance(budget, dict):
        budget, _ = _unwrap(budget, (*at, "tokens"), assumed)
    prompts = raw.get("prompts")
    if isinstance(prompts, dict):
        prompts, _ = _unwrap(prompts, (*at, "prompts"), assumed)
    return Training(
        name=raw.get("name", kind), kind=kind, start=raw.get("from"), teacher=raw.get("teacher"),
        data=raw["data"], tokens=None if budget is None else tokens(budget),
        prompts=None if prompts is None else quantity(prompts),
        seq_len=raw.get("seq_len", 0), options=options, settings=settings, at=at,
    )


def _shape(arch: dict) -> Shape:
    arch = expand(arch)
    return Shape(
        family=arch["family"], layers=arch["layers"], hidden=arch["hidden"], ffn=arch["ffn"],
        heads=arch["heads"], kv_heads=arch["kv_heads"],
        head_dim=arch.get("head_dim") or arch["hidden"] // arch["heads"],
        vocab=arch["vocab"], tied_embeddings=arch.get("tied_embeddings", False),
    )


def _arch_provenance(model: dict, at: tuple) -> dict:
    """Where a model's shape came from: a preset (and the keys written over it), the spec, or
    the checkpoint's config.json."""
    arch = model.get("arch")
    if arch is None:
        src = model["source"]
        return {"shape": f"config:{src['path']}/config.json" if "path" in src else "unknown"}
    if "preset" not in arch:
        return {"shape": f"spec:{where((*at, 'arch'))}"}
    preset = PRESETS[arch["preset"]]
    prov = {"shape": f"preset:{arch['preset']} ({preset['config']})"}
    prov.update({f"shape.{k}": f"spec:{where((*at, 'arch', k))}" for k in arch if k != "preset"})
    return prov


def _context(arch: dict | None, config: dict | None) -> int | None:
    """A model's context length: `arch.max_position_embeddings`, else its config.json's (the text
    config's for a vision-language parent), else unknown."""
    if arch is not None:
        return arch.get("max_position_embeddings")
    text = (config or {}).get("text_config", config or {})
    value = text.get("max_position_embeddings") if isinstance(text, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def lower(doc: Document, configs: dict[str, dict] | None = None) -> FamilySpec:
    """Lower a schema-valid document. ``configs``: model name -> its local config.json mapping."""
    raw = counts.whole(doc, family_schema())  # `tokens: 3e12` -> 3_000_000_000_000
    configs = configs or {}
    assumed: list = []
    base = Settings(values=dict(DEFAULTS), provenance={k: "default" for k in DEFAULTS})
    family_settings = _inherit(base, raw.get("defaults"), ("defaults",), assumed)

    hw_raw = raw.get("hardware", {})
    hw_values, hw_prov = dict(HARDWARE_DEFAULTS), {k: "default" for k in HARDWARE_DEFAULTS}
    for key, v in hw_raw.items():
        hw_values[key], hw_prov[key] = _unwrap(v, ("hardware", key), assumed)
    if hw_values["peak_tflops"] is None:
        hw_values["peak_tflops"] = PEAK_TFLOPS[hw_values["device"]]
        hw_prov["peak_tflops"] = f"default: dense bf16 peak of {hw_values['device']}"
    hw_values["memory_gb"] = DEVICE_MEMORY_GB[hw_values["device"]]  # the fit check's default budget
    hw_prov["memory_gb"] = f"default: memory of one {hw_values['device']}"
    hardware = Settings(values=hw_values, provenance=hw_prov)

    models = {}
    for name, m in raw["models"].items():
        at = ("models", name)
        config_arch = from_hf_config(configs[name]) if name in configs else None
        arch = _shape(m["arch"]) if "arch" in m else config_arch
        boot = m["source"].get("bootstrap")
        bootstrap = None
        if boot is not None:
            bootstrap = _training(boot, "bootstrap", (*at, "source", "bootstrap"), family_settings, assumed)
        models[name] = ModelSpec(name=name, source=m["source"], arch=arch, description=m.get("description"),
                                 bootstrap=bootstrap, at=at, config_arch=config_arch,
                                 arch_provenance=_arch_provenance(m, at),
                                 context=_context(expand(m["arch"]) if "arch" in m else None, configs.get(name)))

    data = {
        name: DataSpec(
            name=name, kind=d["kind"], paths=tuple(d.get("paths", ())), field=d.get("field"),
            builtin=d.get("builtin"), split=d.get("split"), mix=dict(d.get("mix", {})),
            **{k: d.get(k) for k in ("hub", "revision", "subset", "format", "system", "on_error")},
            tasks=_tasks(d), think=d.get("think"), unfinished=d.get("unfinished"),
            stream=d.get("stream", False), shuffle=d.get("shuffle", True), tokens=quantity(d["tokens"]) if "tokens" in d else None,
            at=("data", name),
        )
        for name, d in raw["data"].items()
    }
    judges = {
        name: JudgeSpec(name=name, kind=j["kind"], model=j.get("model"),
                        options={k: _unwrap(v, ("judges", name, k), assumed)[0]
                                 for k, v in j.items() if k not in ("kind", "model")},
                        at=("judges", name))
        for name, j in raw.get("judges", {}).items()
    }

    children = []
    for i, c in enumerate(raw["children"]):
        at = ("children", i)
        child_settings = _inherit(family_settings, c.get("defaults"), (*at, "defaults"), assumed)
        pruning = c.get("pruning", {})
        calibration = _inherit(child_settings, {"calibration": pruning.get("calibration", {})},
                               (*at, "pruning"), assumed)
        shape = c["shape"]
        solve = shape.get("solve", {})
        explicit = {k: shape[k] for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "tied_embeddings") if k in shape}
        default_axes = tuple(a for a in ("layers", "hidden", "ffn") if a not in explicit)
        phases = tuple(
            _training(p, "distill", (*at, "phases", j), child_settings, assumed) for j, p in enumerate(c["phases"])
        )
        variants = tuple(
            (vname, tuple(_training(s, s["kind"], (*at, "variants", vname, k), child_settings, assumed)
                          for k, s in enumerate(steps)))
            for vname, steps in c.get("variants", {}).items()
        )
        children.append(ChildSpec(
            name=c["name"], prune_from=c["prune_from"],
            shape=ShapeRequest(
                explicit=explicit, params=quantity(shape["params"]) if "params" in shape else None,
                solve_axes=tuple(a for a in solve.get("axes", default_axes) if a not in explicit),
                tolerance=solve.get("tolerance", 0.02),
                multiple_of={"hidden": 256, "ffn": 256, **solve.get("multiple_of", {})},
                order=solve.get("order", "uniform"),
                at=(*at, "shape"),
            ),
            methods={k: v for k, v in pruning.items() if k != "calibration"},
            calibration=calibration, phases=phases, variants=variants,
            control=controls(c.get("control", False)), export=c.get("export", True), at=at,
        ))

    ev = raw.get("eval")
    budget = {k: _unwrap(v, ("budget", k), assumed)[0] for k, v in raw.get("budget", {}).items()}
    return FamilySpec(
        path=doc.path, spec_sha256=hashlib.sha256(doc.text.encode()).hexdigest(), family=raw["family"],
        description=raw.get("description"),
        budget_tokens=quantity(budget["tokens"]) if "tokens" in budget else None,
        from_scratch_tokens=quantity(budget["from_scratch_tokens"]) if "from_scratch_tokens" in budget else None,
        hardware=hardware, models=models, data=data, judges=judges, children=tuple(children),
        eval=EvalSpec(data=ev["data"], tokens=quantity(ev["tokens"]), seq_len=_lengths(ev["seq_len"])[0],
                      contexts=_lengths(ev["seq_len"]), at=("eval",),
                      harness=harness(ev["harness"]) if ev.get("harness") else None) if ev else None,
        assumed=tuple(assumed), defaults=family_settings,
    )


def _tasks(d: dict) -> tuple[str, ...] | None:
    """The tasks a `builtin: tasks` source generates: the spec's list, or all of them written out."""
    if "tasks" in d:
        return tuple(d["tasks"])
    return BUILTIN_TASKS if d.get("builtin") == "tasks" else None


def controls(raw) -> tuple[str, ...]:
    """`control:` as a tuple of bases: true is one equal-tokens control (what it always meant)."""
    if isinstance(raw, bool):
        return ("equal-tokens",) if raw else ()
    return (raw,) if isinstance(raw, str) else tuple(raw)


def _lengths(raw) -> tuple[int, ...]:
    """`eval.seq_len` as a tuple of context lengths, in spec order."""
    return (raw,) if isinstance(raw, int) else tuple(raw)


HARNESS_BATCH = 8
GENERATED = {"perplexity": {"limit": 100}, "next_line": {"choices": 4, "limit": 200},
             # task accuracy: small by default, it runs per checkpoint (benchmarks/task_accuracy.py)
             "tasks": {"k": 4, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 32, "limit": 25, "seed": 0,
                       "batch_size": 64, "checkpoints": "final"}}


def harness(raw: dict) -> dict:
    """`eval.harness` as the plan states it: every task a dict with all its settings.

    A named task keeps ``num_fewshot``/``limit`` null where neither it nor the block sets one (the
    harness's own default); a generated task (`perplexity`, `next_line`, `tasks`) names its data source and
    gets its defaults written out, so the plan says exactly what is scored.
    """
    tasks = []
    for i, item in enumerate(raw["tasks"]):
        item = {"task": item} if isinstance(item, str) else dict(item)
        gen = next((k for k in GENERATED if k in item), None)
        if gen:
            tasks.append({"generate": gen, "data": item.pop(gen), **GENERATED[gen], **item, "at": ("eval", "harness", "tasks", i)})
        else:
            tasks.append({"task": item["task"], "num_fewshot": item.get("num_fewshot", raw.get("num_fewshot")),
                          "limit": item.get("limit", raw.get("limit")), "at": ("eval", "harness", "tasks", i)})
    return {"tasks": tasks, "include": list(raw.get("include") or []),
            "batch_size": raw.get("batch_size", HARNESS_BATCH)}

