"""Pass 5 — graph: a checked FamilySpec -> the stage DAG (networkx), one node per stage.

    bootstrap/parent ─▶ calibrate/c1 ─▶ prune/c1 ─▶ distill/c1/short ─▶ distill/c1/long ─▶ sft/c1/instruct/sft …
                                                          │
                                                          └─▶ calibrate/c2 ─▶ prune/c2 ─▶ …   (prune_from: c1/short)
    teachers, calibration sources and starting checkpoints are edges too; tokenize/<data>/<model>
    tokenises a source once per tokenizer (the root model's: pruning copies it) for every stage
    that reads it as tokens (distill, control, teacher-logits, eval); control/<child>/<basis>
    trains the child's shape from scratch (equal-tokens: on its tokens; compute-matched: on as
    many as its making spent); eval/<child> and export/<child> hang off a
    child's checkpoints; report/<family> collects every eval.

Each node's `stage` attribute holds id, kind, inputs, outputs, config, launch and provenance;
`plan` adds hashes and estimates (from the private keys: `_n`/`_shape` the model a stage runs,
`_n_teacher`/`_teacher` an online teacher, `_tokens`, `_budget` the device memory in GB and `_at`
the spec path a fit diagnostic points at). Pure.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import networkx as nx

from . import estimate, grpo, judging, mix, resolve, rewarding
from .shapes import Shape, param_count
from .source import where
from .spec import ChildSpec, FamilySpec, Training

TRAINING_GROUPS = ("optimizer", "schedule", "batch", "checkpoint")
SLURM_OPTIONS = ("partition", "account", "qos", "max_hours")
LOCAL = {"devices": 1, "nodes": 1, "launcher": "local", "strategy": "none"}
# odpo's win rate against the starting policy: 64 held-out prompts (a standard error of about
# 0.06 on a win rate near 0.5), measured every 50 steps; the spec's `win_rate` overrides.
WIN_RATE = {"prompts": 64, "every_steps": 50}
# Calibration scores each pruning method reads (see runtime/surgery/keep.py).
SCORES = {"norm_ratio": "norm_ratio", "block_influence": "block_influence", "angular": "angular",
          "pca": "hidden_pca", "channel": "hidden_channel", "activation": "ffn_activation",
          "query": "heads", "kv_groups": "heads"}


def _path(stage: str, name: str) -> str:
    return f"stages/{stage}/{name}"


def _prov(settings, groups, prefix="config") -> dict:
    return {f"{prefix}.{k}": v for k, v in settings.provenance.items()
            if k.split(".")[0] in groups or k in groups}


def _launch(settings) -> tuple[dict, dict]:
    r = settings.group("resources")
    launch = {k: r[k] for k in ("devices", "nodes", "launcher", "strategy")}
    return launch, {f"launch.{k}": settings.provenance[f"resources.{k}"] for k in launch}


def _slurm(settings) -> dict:
    """Slurm options set in the spec (partition, account, qos, max_hours): rendered by `plan --emit`,
    not hashed (where a stage is queued does not change what it computes)."""
    if settings is None:
        return {}
    return {k: settings[f"resources.{k}"] for k in SLURM_OPTIONS if settings[f"resources.{k}"] is not None}


def _training_config(t: Training, spec: FamilySpec, steps: int, offset: int, sources: dict | None = None) -> tuple[dict, dict]:
    """The keys every training stage shares (docs/plan.md), and their provenance."""
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
        "data": {"name": t.data, "offset": offset, "shuffle": spec.data[t.data].shuffle, **_mix_config(spec, t.data, sources)},
        "optimizer": s.group("optimizer"),
        "schedule": {"kind": s["schedule.kind"], "warmup_steps": warmup},
        "checkpoint": s.group("checkpoint"),
        "seed": s["seed"],
        "precision": s["resources.precision"],
        "activation_checkpointing": s["resources.activation_checkpointing"],
    }
    prov["config.activation_checkpointing"] = s.provenance["resources.activation_checkpointing"]
    return config, prov


def _mix_config(spec: FamilySpec, data: str, sources: dict | None) -> dict:
    """The keys a stage reading a mix adds to `config.data`: the weights and, per source, the
    window it reads (offset, sequences, tokens). Empty for a plain source."""
    if sources is None:
        return {}
    return {"mix": dict(sorted(spec.data[data].mix.items())), "sources": sources}


def _widest(windows: list[dict | None]) -> dict | None:
    """Per source of a mix, the largest of the eval contexts' windows (what the stage must read)."""
    if not windows or windows[0] is None:
        return None
    return {name: max((w[name] for w in windows), key=lambda x: x["tokens"]) for name in windows[0]}


def compute_note(spent: dict[str, int], steps: int, first: Training) -> str:
    """The plan's note of a compute-matched control: the sum, term by term, and its whole steps."""
    per = first.seq_len * first.settings["batch.global"]
    total = sum(spent.values())
    terms = " + ".join(f"{sid} {n:,}" for sid, n in spent.items())
    return (f"compute-matched: {total:,} tokens = {terms}; trains {steps:,} whole steps of {per:,} tokens "
            f"(seq_len {first.seq_len:,} x batch {first.settings['batch.global']:,}) = {steps * per:,}")


@dataclass(frozen=True)
class Window:
    """A training as the plan runs it: its steps and where in its data stream it reads."""

    child: ChildSpec
    variant: str | None
    training: Training
    ref: str
    steps: int
    offset: int
    sources: dict | None = None  # per-source windows of a mix (`Builder.mix_window`)

    @property
    def tokens(self) -> int:
        t = self.training
        return 0 if t.kind in ("odpo", "grpo") else self.steps * t.seq_len * t.settings["batch.global"]


@dataclass
class Builder:
    spec: FamilySpec
    g: nx.DiGraph = field(default_factory=nx.DiGraph)

    def __post_init__(self):
        self.cps = resolve.checkpoints(self.spec)
        self.shapes = resolve.shapes(self.spec, self.cps)
        self.offsets: dict[str, int] = {}

    # -- helpers ----------------------------------------------------------------------------

    def add(self, stage: dict, settings=None) -> None:
        """Add a stage; its Slurm options come from ``settings`` (default: the family's)."""
        slurm = _slurm(settings or self.spec.defaults)
        if slurm:
            stage["slurm"] = slurm
        self.g.add_node(stage["id"], stage=stage)
        for inp in stage["inputs"]:
            if "stage" in inp:
                self.g.add_edge(inp["stage"], stage["id"])

    def checkpoint(self, role: str, ref: str) -> dict:
        cp = self.cps[ref]
        if cp.stage is None:
            return {"role": role, "model": cp.model}
        return {"role": role, "stage": cp.stage, "path": _path(cp.stage, "model")}

    def shape_of(self, ref: str) -> Shape:
        cp = self.cps[ref]
        return self.shapes[cp.model or cp.child]

    def tokenizer_of(self, ref: str) -> str:
        """The model whose tokenizer checkpoint ``ref`` carries: pruning copies the tokenizer, so a
        child's is the root of its cascade (a model of the spec, or one bootstrapped here)."""
        cp = self.cps[ref]
        while cp.model is None:
            cp = resolve.lookup(next(x for x in self.spec.children if x.name == cp.child).prune_from, self.cps)
        return cp.model

    def tokens(self, data: str, model: str) -> dict:
        """The input that reads source ``data`` tokenised with ``model``'s tokenizer: the output of
        tokenize/<data>/<model>, planned here on first use and shared by every later reader
        (a `tokenized` source too: its ids are copied into the same shards, EOS after each
        document, so every reader has one format)."""
        sid = resolve.stage_id("tokenize", data, model)
        if sid not in self.g:
            launch, lprov = _launch(self.spec.defaults)
            launch["strategy"] = "none"  # no model: processes only split the files
            self.add({"id": sid, "kind": "tokenize",
                      "inputs": [self.checkpoint("tokenizer", model), {"role": "data", "data": data}],
                      "outputs": [_path(sid, "tokens")], "config": {"data": {"name": data}},
                      "launch": launch, "provenance": {**lprov, "launch.strategy": "default: tokenize loads no model"},
                      "_n": 0, "_tokens": self.spec.data[data].tokens or 0})
        return {"role": "tokens", "stage": sid, "path": _path(sid, "tokens")}

    def budget(self, settings=None) -> float | None:
        """Device memory (GB) a stage must fit in: `resources.memory_gb`, else the device's."""
        given = settings["resources.memory_gb"] if settings is not None else None
        return given if given is not None else self.spec.hardware["memory_gb"]

    def mix_window(self, data: str, seq_len: int, sequences: int, starts: dict | None = None) -> dict | None:
        """Per source of mix ``data``: the window a stage of ``sequences`` sequences reads
        ({offset, sequences, tokens}); None when ``data`` is not a mix. A streamed mix advances
        each source's own offset (the single-pass rule per source); ``starts`` fixes the offsets
        instead (a control reads its first phase's windows)."""
        d = self.spec.data[data]
        if d.kind != "mix":
            return None
        out = {}
        for name, n in mix.counts(d.mix, sequences).items():
            tokens = n * seq_len
            if starts is not None:
                offset = starts[name]["offset"]
            elif d.stream:
                offset = self.offsets.get(f"mix:{name}", 0)
                self.offsets[f"mix:{name}"] = offset + tokens
            else:
                offset = 0
            out[name] = {"offset": offset, "sequences": n, "tokens": tokens}
        return out

    def reading(self, data: str, model: str) -> list[dict]:
        """The inputs of a stage reading ``data`` as tokens of ``model``'s tokenizer: one
        tokenize output, or for a mix one per source (role `tokens:<source>`)."""
        d = self.spec.data[data]
        if d.kind != "mix":
            return [self.tokens(data, model)]
        return [{**self.tokens(name, model), "role": f"tokens:{name}"} for name in sorted(d.mix)]

    def window(self, data: str, tokens: int) -> int:
        """Offset of the next window of a streamed source; 0 for a source every stage rereads."""
        if not self.spec.data[data].stream:
            return 0
        start = self.offsets.get(data, 0)
        self.offsets[data] = start + tokens
        return start

    # -- stages -------------------------------------------------------------------------------

    def bootstraps(self) -> None:
        for m in self.spec.models.values():
            if m.bootstrap is None:
                continue
            t = m.bootstrap
            n = resolve.steps(t, self.spec)
            tokens = n * t.seq_len * t.settings["batch.global"]
            config, prov = _training_config(t, self.spec, n, self.window(t.data, tokens))
            config.update(shape=m.arch.axes(), tokenizer={"vocab_size": m.arch.vocab}, tokens=tokens)
            launch, lprov = _launch(t.settings)
            sid = resolve.stage_id("bootstrap", m.name)
            self.add({"id": sid, "kind": "bootstrap", "inputs": [{"role": "data", "data": t.data}],
                      "outputs": [_path(sid, "model")], "config": config, "launch": launch,
                      "provenance": {**prov, **lprov}, "_n": param_count(m.arch),
                      "_shape": m.arch, "_budget": self.budget(t.settings), "_at": t.at}, t.settings)

    def windows(self) -> list[Window]:
        """Every training in plan order, with its steps and stream window."""
        out = []
        for c, variant, t, ref in resolve.trainings(self.spec):
            w = Window(c, variant, t, ref, resolve.steps(t, self.spec) or 0, 0)
            if w.tokens and self.spec.data[t.data].kind == "mix":
                w = dataclasses.replace(w, sources=self.mix_window(t.data, t.seq_len, w.steps * t.settings["batch.global"]))
            elif w.tokens:
                w = dataclasses.replace(w, offset=self.window(t.data, w.tokens))
            out.append(w)
        return out

    def teacher_caches(self, windows: list[Window]) -> dict[str, str]:
        """One teacher-logits stage per (teacher, data window, seq_len, top-k) that several
        trainings share; returns training ref -> cache stage id."""
        groups: dict = {}
        for w in windows:
            t, top_k = w.training, w.training.settings["loss.top_k"]
            # a mix is read sequence by sequence from several streams: not cached (docs/plan.md)
            if t.teacher is not None and top_k is not None and t.kind in ("distill", "sft") and w.sources is None:
                teacher = resolve.lookup(t.teacher, self.cps, w.child).ref
                groups.setdefault((teacher, t.data, w.offset, t.seq_len, top_k), []).append(w)
        cache_of = {}
        for (teacher, data, offset, seq_len, top_k), users in sorted(groups.items(), key=lambda kv: kv[0]):
            if len(users) < 2:
                continue
            sid = resolve.stage_id("teacher-logits", teacher.replace("/", "."), data + (f"@{offset}" if offset else ""))
            cache_of.update({w.ref: sid for w in users})
            first = users[0].training
            launch, lprov = _launch(first.settings)
            self.add({"id": sid, "kind": "teacher-logits",
                      "inputs": [self.checkpoint("teacher", teacher), self.tokens(data, self.tokenizer_of(teacher))],
                      "outputs": [_path(sid, "logits")],
                      "config": {"seq_len": seq_len, "tokens": max(w.tokens for w in users),
                                 "data": {"name": data, "offset": offset}, "top_k": top_k,
                                 "micro_batch": first.settings["batch.micro"],
                                 "precision": first.settings["resources.precision"],
                                 # every τ its readers distill at: the cache stores the rest mass at each
                                 "temperatures": sorted({float(w.training.settings["loss.temperature"]) for w in users}),
                                 "users": sorted(w.ref for w in users)},
                      "launch": launch, "provenance": lprov, "_n": param_count(self.shape_of(teacher)),
                      "_shape": self.shape_of(teacher), "_budget": self.budget(first.settings), "_at": first.at}, first.settings)
        return cache_of

    def surgery(self, c: ChildSpec) -> None:
        """calibrate/<child> (when any axis shrinks) and prune/<child>."""
        src = resolve.lookup(c.prune_from, self.cps).ref
        source, target = self.shape_of(src), self.shapes[c.name]
        methods, how = resolve.methods(c, source, target)
        shrinks = {a for a, m in methods.items() if m}
        method_prov = {f"config.methods.{a}": how[a] for a in shrinks}
        if c.shape.params is not None:
            method_prov["config.target"] = f"solved:{where((*c.shape.at, 'params'))} ({c.shape.order})"
        cal = c.calibration
        inputs = [self.checkpoint("model", src)]
        if shrinks:
            sid = resolve.stage_id("calibrate", c.name)
            samples, seq_len = cal["calibration.samples"], cal["calibration.seq_len"]
            launch, lprov = _launch(cal)
            self.add({"id": sid, "kind": "calibrate",
                      "inputs": [self.checkpoint("model", src), {"role": "data", "data": cal["calibration.data"]}],
                      "outputs": [_path(sid, "stats.safetensors"), _path(sid, "summary.json")],
                      "config": {"samples": samples, "seq_len": seq_len, "batch_size": cal["calibration.batch_size"],
                                 "data": {"name": cal["calibration.data"], "offset": 0}, "seed": cal["seed"],
                                 "scores": [SCORES[m] for m in methods.values() if m in SCORES],
                                 "angular_block": source.layers - target.layers if methods["layers"] == "angular" else None,
                                 "precision": cal["resources.precision"]},
                      "launch": launch, "provenance": {**_prov(cal, ("calibration", "seed")), **lprov},
                      "_n": param_count(source), "_tokens": samples * seq_len, "_shape": source,
                      "_budget": self.budget(cal), "_at": (*c.at, "pruning")}, cal)
            inputs.append({"role": "stats", "stage": sid, "path": _path(sid, "stats.safetensors")})
        sid = resolve.stage_id("prune", c.name)
        self.add({"id": sid, "kind": "prune", "inputs": inputs, "outputs": [_path(sid, "model")],
                  "config": {"source_shape": source.axes(), "target": target.axes(), "methods": methods,
                             "tie_embeddings": target.tied_embeddings and not source.tied_embeddings},
                  "launch": dict(LOCAL),  # one process streams the checkpoint
                  "provenance": method_prov, "_n": param_count(target)}, cal)

    def training(self, w: Window, cache_of: dict[str, str]) -> None:
        """distill/<child>/<phase> or <kind>/<child>/<variant>/<step>."""
        c, t, ref = w.child, w.training, w.ref
        at = where(t.at)
        config, prov = _training_config(t, self.spec, w.steps, w.offset, w.sources)
        start = resolve.lookup(resolve.starts(c)[ref], self.cps, c).ref
        # distill reads token shards, sft conversations with their assistant mask: both from the
        # tokenize stage of (source, tokenizer), shared with every other reader
        reads = self.reading(t.data, self.tokenizer_of(start)) if t.kind in ("distill", "sft") else \
            [{"role": "data", "data": t.data}]
        inputs = [self.checkpoint("student" if t.kind in ("distill", "sft") else "policy", start), *reads]
        n_teacher, teacher_shape = 0, None
        if t.teacher is not None:
            teacher = resolve.lookup(t.teacher, self.cps, c).ref
            if ref in cache_of:  # the teacher's forward is paid once, by the cache stage
                inputs.append({"role": "teacher_logits", "stage": cache_of[ref], "path": _path(cache_of[ref], "logits")})
            else:
                inputs.append(self.checkpoint("teacher", teacher))
                teacher_shape = self.shape_of(teacher)
                n_teacher = param_count(teacher_shape)
        if t.kind in ("distill", "sft"):
            config["loss"] = {**t.settings.group("loss"), "teacher": t.teacher is not None}
            prov.update(_prov(t.settings, ("loss",)))
        if t.kind == "distill":
            rope = t.options.get("rope")
            config["phase"] = t.name
            config["rope"] = None if rope is None else {
                "rope_parameters": rope, "max_position_embeddings": t.options.get("max_position_embeddings", t.seq_len)}
        if t.kind == "sft":
            config["assistant_only"] = t.options.get("assistant_only", True)
        if t.kind in ("dpo", "odpo", "grpo"):
            config["beta"] = t.options.get("beta", 0.0 if t.kind == "grpo" else 0.1)
            prov["config.beta"] = f"spec:{at}.beta" if "beta" in t.options else "default"
        if t.kind in ("odpo", "grpo"):
            config["prompts"] = w.steps * t.settings["batch.global"]
            config["generation"] = t.settings.group("generation")
            prov.update(_prov(t.settings, ("generation",)))
            judges = [t.options["judge"]] if "judge" in t.options else list(t.options.get("rewards", []))
            # a compare_rewards judge brings the rewards it totals: the runtime builds them from the plan
            judges += [r for j in judges if self.spec.judges[j].kind == judging.COMPARE
                       for r in self.spec.judges[j].options["rewards"] if r not in judges]
            config["judges"] = {j: {"kind": self.spec.judges[j].kind, **self.spec.judges[j].options} for j in judges}
            for j in judges:
                if config["judges"][j]["kind"] == judging.COMPARE and "temperature" not in config["judges"][j]:
                    config["judges"][j]["temperature"] = judging.COMPARE_TEMPERATURE
                    prov[f"config.judges.{j}.temperature"] = "default"
                elif config["judges"][j]["kind"] in rewarding.OPTIONS:
                    config["judges"][j], defaulted = rewarding.resolve(
                        self.spec.judges[j].kind, self.spec.judges[j].options, config["generation"]["max_new_tokens"])
                    prov.update({f"config.judges.{j}.{k}": "default" + (": generation.max_new_tokens" * (
                        k == "max_tokens")) for k in defaulted})
            for j in judges:
                if self.spec.judges[j].model is not None:
                    inputs.append(self.checkpoint(f"judge:{j}", resolve.lookup(self.spec.judges[j].model, self.cps).ref))
            if t.kind == "odpo":
                config["strip_thinking"] = t.options.get("strip_thinking", False)
                win = t.options.get("win_rate", {})
                config["win_rate"] = {**WIN_RATE, **win}
                prov["config.win_rate"] = f"spec:{at}.win_rate" if win else "default"
            else:
                settings, given = grpo.resolve(t.options)
                preset = f"spec:{at}.preset" if "preset" in t.options else f"default: the {settings['preset']} preset"
                prov["config.preset"] = preset if "preset" in t.options else "default"
                for key, how in given.items():
                    named = "clip" if key.startswith("epsilon") and "clip" in t.options else key
                    if key != "beta" or "beta" not in t.options:
                        config[key] = settings[key]
                        prov[f"config.{key}"] = f"spec:{at}.{named}" if how == "spec" else preset
                config["preset"] = settings["preset"]
        else:
            config["tokens"] = w.tokens
        launch, lprov = _launch(t.settings)
        sid = self.cps[ref].stage
        note = resolve.rounding_note(t, self.spec)
        self.add({"id": sid, "kind": t.kind, "inputs": inputs, "outputs": [_path(sid, "model")],
                  "config": config, "launch": launch, "provenance": {**prov, **lprov},
                  **({"notes": [note]} if note else {}),
                  "_n": param_count(self.shapes[c.name]), "_n_teacher": n_teacher, "_shape": self.shapes[c.name],
                  "_teacher": teacher_shape, "_budget": self.budget(t.settings), "_at": t.at}, t.settings)

    def control(self, c: ChildSpec, basis: str) -> None:
        """control/<child>/<basis>: the child's shape, random init, next-token loss, at its first
        phase's sequence length and batch. `equal-tokens`: the same tokens as its distillation
        phases (the first phase's window). `compute-matched`: as many tokens as every training its
        final base checkpoint descends from (`resolve.lineage`), read from the start of the first
        phase's data: the tokens the cascade itself read first (docs/plan.md, "Controls")."""
        first = c.phases[0]
        per_step = first.seq_len * first.settings["batch.global"]
        if basis == "equal-tokens":
            phases = [self.g.nodes[self.cps[f"{c.name}/{p.name}"].stage]["stage"]["config"] for p in c.phases]
            n = sum(p["tokens"] for p in phases) // per_step
            offset, starts = phases[0]["data"]["offset"], phases[0]["data"].get("sources")
            why, notes = "same tokens as the child's distillation phases", []
        else:
            spent = resolve.lineage(self.spec, self.cps, f"{c.name}/{c.phases[-1].name}")
            n = sum(spent.values()) // per_step
            mixed = self.spec.data[first.data].mix
            offset, starts = 0, {name: {"offset": 0} for name in mixed} if mixed else None
            why = f"compute-matched: the tokens of every training {c.name}/{c.phases[-1].name} descends from"
            notes = [compute_note(spent, n, first)]
        sources = starts and self.mix_window(first.data, first.seq_len, n * first.settings["batch.global"], starts)
        config, prov = _training_config(first, self.spec, n, offset, sources)
        config.update(shape=self.shapes[c.name].axes(), tokens=n * per_step)
        launch, lprov = _launch(first.settings)
        root = self.tokenizer_of(c.prune_from)  # the tokenizer comes from the root of the cascade
        sid = resolve.stage_id("control", c.name, basis)
        self.add({"id": sid, "kind": "control",
                  "inputs": [self.checkpoint("template", root), *self.reading(first.data, root)],
                  "outputs": [_path(sid, "model")], "config": config, "launch": launch,
                  "provenance": {**prov, **lprov, "config.tokens": why}, **({"notes": notes} if notes else {}),
                  "_n": param_count(self.shapes[c.name]), "_shape": self.shapes[c.name],
                  "_budget": self.budget(first.settings), "_at": (*c.at, "control")}, first.settings)

    def eval(self, owner: str, names: list[str], finals: list[str]) -> str:
        """``finals``: the checkpoints a `checkpoints: final` task scores (the root, or a child's last
        phase and its post-training steps)."""
        sid = resolve.stage_id("eval", owner)
        ev = self.spec.eval
        s = self.spec.defaults
        launch, prov = _launch(s)
        nodes = max(1, launch["nodes"])  # one node's devices: replicas need no second node
        launch.update(devices=max(1, launch["devices"] // nodes), nodes=1, strategy="none")
        prov.update({"launch.devices": f"one node of {prov['launch.devices']}", "launch.nodes": "eval runs on one node",
                     "launch.strategy": "eval replicates the model on each device"})
        zeros = {name: {"offset": 0} for name in self.spec.data[ev.data].mix}  # every eval reads from the start
        config = {"data": {"name": ev.data, "offset": 0, **_mix_config(self.spec, ev.data, self.mix_window(
                      ev.data, ev.seq_len, ev.tokens // ev.seq_len, starts=zeros))},
                  "tokens": ev.tokens, "seq_len": ev.seq_len,
                  "checkpoints": names, "precision": s["resources.precision"],
                  "micro_batch": estimate.eval_batch(ev.seq_len), "chunk_tokens": s["loss.chunk_tokens"]}
        tokens = ev.tokens
        if len(ev.contexts) > 1:  # every length over the same first tokens; marked beyond a checkpoint's training
            common = ev.tokens // math.lcm(*ev.contexts) * math.lcm(*ev.contexts)
            windows = [self.mix_window(ev.data, n, common // n, starts=zeros) for n in ev.contexts]
            config["data"].update(_mix_config(self.spec, ev.data, _widest(windows)))
            config["tokens"] = common
            config["contexts"] = [{"seq_len": n, "tokens": common, "micro_batch": estimate.eval_batch(n),
                                   **({"sources": w} if w else {})} for n, w in zip(ev.contexts, windows)]
            trained = resolve.trained_contexts(self.spec, self.cps)
            config["trained_context"] = {n: trained.get(n) for n in names}
            tokens = common * len(ev.contexts)
        extra = []
        if ev.harness:  # the harness reads text: generated tasks and task folders are raw data inputs
            h = ev.harness
            config["harness"] = {"tasks": [_scored(t, names, finals) for t in h["tasks"]],
                                 "include": h["include"], "batch_size": h["batch_size"]}
            reads = sorted({t["data"] for t in h["tasks"] if "generate" in t} | set(h["include"]))
            extra = [{"role": f"harness:{d}", "data": d} for d in reads]
        self.add({"id": sid, "kind": "eval",
                  "inputs": [self.checkpoint(f"checkpoint:{n}", n) for n in names]
                  + self.reading(ev.data, self.tokenizer_of(names[0])) + extra,
                  "outputs": [_path(sid, "eval.json")],
                  "config": config,
                  "launch": launch, "provenance": {**prov, "config.precision": s.provenance["resources.precision"],
                                                   "config.chunk_tokens": s.provenance["loss.chunk_tokens"]},
                  "_n": param_count(self.shapes[owner]),
                  "_tokens": tokens * len(names), "_shape": self.shapes[owner], "_budget": self.budget(),
                  "_at": ev.at})
        return sid

    def export(self, c: ChildSpec, eval_sid: str | None) -> None:
        finals = [f"{c.name}/{c.phases[-1].name}"] + [f"{c.name}/{v}/{steps[-1].name}" for v, steps in c.variants]
        names = [f.split("/", 1)[1].replace("/", "-") for f in finals]
        sid = resolve.stage_id("export", c.name)
        inputs = [self.checkpoint(f"checkpoint:{f}", f) for f in finals]
        if eval_sid is not None:  # the model card's results table
            inputs.append({"role": "eval", "stage": eval_sid, "path": _path(eval_sid, "eval.json")})
        self.add({"id": sid, "kind": "export", "inputs": inputs,
                  "outputs": [_path(sid, n) for n in names],
                  "config": {"names": names, "checkpoints": finals, "card": self.card(c)},
                  "launch": dict(LOCAL), "provenance": {}, "_n": 0}, c.calibration)

    def card(self, c: ChildSpec) -> dict:
        """What the exported model card says: the family, the root it was cut from, and every step
        that made this child (its ancestors' first), with tokens and teachers, as planned."""
        chain, cur = [], c
        while cur is not None:
            chain.insert(0, cur)
            src = resolve.lookup(cur.prune_from, self.cps)
            cur = next((x for x in self.spec.children if x.name == src.child), None) if src.child else None
        root = resolve.lookup(chain[0].prune_from, self.cps).ref
        steps = []
        for x in chain:
            prune = self.g.nodes[resolve.stage_id("prune", x.name)]["stage"]
            steps.append({"stage": prune["id"], "what": f"pruned from {x.prune_from} to {param_count(self.shapes[x.name]):,} "
                          "parameters (" + ", ".join(f"{a}: {m}" for a, m in sorted(prune["config"]["methods"].items()) if m)
                          + ")"})
            trainings = [(None, p) for p in x.phases] + ([(v, s) for v, ss in x.variants for s in ss] if x is c else [])
            for variant, tr in trainings:
                st = self.g.nodes[resolve.training_stage_id(x, tr, variant)]["stage"]
                what = f"{tr.kind} at {tr.seq_len:,} tokens of context"
                what += f", {st['config']['tokens']:,} tokens of {tr.data}" if st["config"].get("tokens") else f", data {tr.data}"
                what += f", teacher {tr.teacher}" if tr.teacher else ""
                steps.append({"stage": st["id"], "what": what})
        source = (self.spec.models.get(root.split("/")[0]) or None)
        return {"family": self.spec.family, "description": self.spec.description, "child": c.name,
                "params": param_count(self.shapes[c.name]), "root": root,
                "root_source": dict(source.source) if source is not None else None, "steps": steps}

    def report(self, evals: list[str]) -> None:
        sid = resolve.stage_id("report", self.spec.family)
        self.add({"id": sid, "kind": "report",
                  "inputs": [{"role": f"eval:{e}", "stage": e, "path": _path(e, "eval.json")} for e in sorted(evals)],
                  "outputs": [_path(sid, "report.md"), _path(sid, "report.json")],
                  "config": {"family": self.spec.family}, "launch": dict(LOCAL), "provenance": {}, "_n": 0})


def _scored(task: dict, names: list[str], finals: list[str]) -> dict:
    """A harness task as an eval stage runs it: `checkpoints` written out as the names it scores."""
    out = {k: v for k, v in task.items() if k != "at"}
    if out.get("checkpoints") == "final":
        out["checkpoints"] = [n for n in names if n in finals]
    elif out.get("checkpoints") == "all":
        out["checkpoints"] = list(names)
    return out


def build(spec: FamilySpec) -> nx.DiGraph:
    b = Builder(spec)
    b.bootstraps()
    windows = b.windows()
    cache_of = b.teacher_caches(windows)
    for c in spec.children:
        b.surgery(c)
        for w in windows:
            if w.child is c:
                b.training(w, cache_of)
    evals = []
    for c in spec.children:  # after every training: a compute-matched control sums its lineage's
        for basis in c.control:
            b.control(c, basis)
        if spec.eval is not None:
            post = [f"{c.name}/{v}/{s.name}" for v, steps in c.variants for s in steps]
            names = [f"{c.name}/pruned"] + [f"{c.name}/{p.name}" for p in c.phases] + post + \
                [resolve.control_ref(c.name, basis) for basis in c.control]
            evals.append(b.eval(c.name, names, [f"{c.name}/{c.phases[-1].name}", *post]))
        if c.export:
            b.export(c, evals[-1] if spec.eval is not None else None)
    if spec.eval is not None:
        roots = sorted({b.cps[c.prune_from].model for c in spec.children if b.cps[c.prune_from].model is not None})
        evals += [b.eval(m, [m], [m]) for m in roots]
        b.report(evals)
    return b.g


def check_acyclic(g: nx.DiGraph) -> list[str] | None:
    """A cycle of stage ids, if the DAG has one (e.g. a child taught by its own descendant)."""
    try:
        return [u for u, _ in nx.find_cycle(g)]
    except nx.NetworkXNoCycle:
        return None
