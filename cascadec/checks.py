"""Pass 4 — checks: FamilySpec -> every semantic diagnostic (errors and warnings), all at once.

Cross-object rules live here and only here: references, names, cycles, shapes, vocabularies,
budgets. Each rule has a stable code; each message points at what the user wrote.
"""

from __future__ import annotations

import math

import networkx as nx

from . import grpo, judging, mix, resolve, rewarding
from .diagnostics import Diagnostic, did_you_mean
from .presets import expand
from .shapes import config_errors, param_count, reachable
from .source import Document, where
from .spec import BUILTIN_TASKS, FamilySpec, Share

RESERVED = {"pruned", "control"}
ROUNDING_WARN = 0.05  # a budget that loses more than 5% to whole steps warns; the plan notes any loss


def run(spec: FamilySpec, doc: Document) -> list[Diagnostic]:
    out: list[Diagnostic] = []

    def diag(code, message, at, help=None, *, key=False, severity="error", notes=()):
        out.append(Diagnostic(code=code, message=message, path=doc.path, span=doc.span(at, key=key),
                              help=help, severity=severity, notes=tuple(notes)))

    cps = resolve.checkpoints(spec)
    refs = sorted(cps)

    def unknown(code, what, ref, at, choices=refs, child=None):
        local = [r.split("/", 1)[1] for r in choices if child is not None and r.startswith(child.name + "/")]
        hint = did_you_mean(ref, [*choices, *local])
        diag(code, f"unknown {what} '{ref}'", at,
             (hint + " " if hint else "") + f"known: {', '.join(sorted(choices)) or 'none'}")

    # -- names ------------------------------------------------------------------------------
    # A name given twice is the root cause of every later confusion about it (a false cycle, a
    # false shape change): the rules below skip children whose name is not unique.
    names_used = [*spec.models, *(c.name for c in spec.children)]
    dupes = {n for n in names_used if names_used.count(n) > 1}
    seen = dict.fromkeys(spec.models, "a model")
    for c in spec.children:
        if c.name in seen:
            diag("CSC205", f"duplicate name '{c.name}': it is already {seen[c.name]}", (*c.at, "name"),
                 "models and children share one namespace; rename one of them")
        seen[c.name] = "a child"
        names: set = set()
        for p in c.phases:
            if p.name in names or p.name in RESERVED:
                diag("CSC205", f"duplicate phase name '{p.name}' in child '{c.name}'", (*p.at, "name"),
                     "phase names are unique per child; 'pruned' and 'control' are reserved")
            names.add(p.name)
        for vname, steps in c.variants:
            if vname in names or vname in RESERVED:
                diag("CSC205", f"variant '{vname}' of child '{c.name}' has the name of a phase", (*c.at, "variants", vname),
                     "give the variant and the phase different names", key=True)
            step_names: set = set()
            for s in steps:
                if s.name in step_names:
                    diag("CSC205", f"duplicate step name '{s.name}' in variant '{vname}'", (*s.at,),
                         "two steps of one kind need explicit, distinct `name:`s")
                step_names.add(s.name)

    # -- data and judges --------------------------------------------------------------------
    data_names = sorted(spec.data)
    for d in spec.data.values():
        for src in d.mix:
            if src not in spec.data:
                unknown("CSC203", "data source", src, (*d.at, "mix", src), data_names)
        if d.kind == "mix" and not d.mix:
            diag("CSC222", f"data '{d.name}' is a mix with no `mix:` sources", d.at, "add `mix: {source: weight}`")
        if d.kind == "mix" and d.mix:
            nested = [s for s in sorted(d.mix) if s in spec.data and spec.data[s].kind == "mix"]
            for s in nested:
                diag("CSC271", f"data '{d.name}' mixes '{s}', which is itself a mix", (*d.at, "mix", s),
                     f"list the sources of '{s}' in '{d.name}' directly, with their weights multiplied out", key=True)
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in d.mix.values()):
                continue  # the schema reports the weight
            if (p := mix.period(d.mix)) > mix.MAX_PERIOD:
                diag("CSC270", f"the weights of mix '{d.name}' need a period of {p:,} sequences "
                     f"(at most {mix.MAX_PERIOD:,})", (*d.at, "mix"),
                     "write the weights with fewer digits (0.7 and 0.3, or 7 and 3): sequences are "
                     "interleaved in a fixed period whose length is the weights' common denominator")
        if d.kind == "builtin" and not d.builtin:
            diag("CSC222", f"data '{d.name}' is builtin but names no corpus", d.at, "add `builtin: stdlib` (or tasks)")
        if d.kind in ("text", "jsonl", "parquet", "tokenized") and not d.paths:
            diag("CSC222", f"data '{d.name}' of kind {d.kind} has no `paths`", d.at, "add `paths: [data/*.jsonl]`")
        _check_reader(diag, d)

    def check_data(name, at, reader="distill"):
        if name is not None and name not in spec.data:
            unknown("CSC203", "data source", name, at, data_names)
        elif name is not None:
            _check_format(diag, spec.data[name], at, reader)

    def mixed(name, at, who):
        """Bootstrap and calibration read a source's documents, not a token stream: no mix."""
        if name in spec.data and spec.data[name].kind == "mix":
            diag("CSC272", f"{who} reads '{name}', a mix; it reads one source's documents", at,
                 f"name one of the sources of '{name}' ({', '.join(sorted(spec.data[name].mix))})")

    for j in spec.judges.values():
        if j.kind in ("pairwise_model", "rubric_model") and j.model is None:
            diag("CSC222", f"judge '{j.name}' of kind {j.kind} needs a `model`", j.at, "add `model: <a model name>`")
        if j.model is not None and resolve.lookup(j.model, cps) is None:
            unknown("CSC201", "model", j.model, (*j.at, "model"))
        _check_judge(diag, j)
        _check_reward_options(diag, j)
        _check_compare(diag, unknown, j, spec.judges)

    # -- models -----------------------------------------------------------------------------
    for m in spec.models.values():
        if m.bootstrap is not None:
            check_data(m.bootstrap.data, (*m.bootstrap.at, "data"), "bootstrap")
            mixed(m.bootstrap.data, (*m.bootstrap.at, "data"), f"the bootstrap of '{m.name}'")
        if m.arch is None and ("hub" in m.source or "bootstrap" in m.source):
            diag("CSC216", f"model '{m.name}' has no architecture", m.at,
                 "add `arch:` (layers, hidden, ffn, heads, kv_heads, vocab, ...); the compiler does not download configs")
        elif m.arch is None:
            diag("CSC216", f"model '{m.name}': cannot read {m.source['path']}/config.json and no `arch:` is given",
                 (*m.at, "source", "path"), "add `arch:` or point `path` at a Hugging Face checkpoint directory")
    for m_name, raw in doc.data.get("models", {}).items():
        arch = raw.get("arch") if isinstance(raw, dict) else None
        if isinstance(arch, dict):
            _check_heads(diag, expand(arch), ("models", m_name, "arch"), written=arch)
            m = spec.models[m_name]
            if m.config_arch is not None and m.arch is not None:
                _check_against_config(diag, m, arch)

    # -- prune_from: references and cycles --------------------------------------------------
    owner_graph = nx.DiGraph()
    for c in spec.children:
        src = resolve.lookup(c.prune_from, cps)
        if src is None:
            unknown("CSC201", "checkpoint", c.prune_from, (*c.at, "prune_from"))
            continue
        if c.name in dupes or (src.child or src.model) in dupes:
            continue
        # a model is a root: a child that shares its name (CSC205 above) must not look like a cycle
        owner_graph.add_edge(("model", src.model) if src.model else src.child, c.name)
        if src.model is None and src.ref.count("/") == 2:
            diag("CSC218", f"child '{c.name}' is pruned from a post-trained checkpoint '{c.prune_from}'",
                 (*c.at, "prune_from"), "cascades prune a base checkpoint (Ministral 3: the short-context one)",
                 severity="warning")
    for cycle in sorted(nx.simple_cycles(owner_graph), key=lambda cy: sorted(cy)):
        start = min(cycle)
        i = cycle.index(start)
        ring = cycle[i:] + cycle[:i]
        child = next(c for c in spec.children if c.name == ring[0])
        diag("CSC206", "prune_from cycle: " + " -> ".join([*ring, ring[0]]), (*child.at, "prune_from"),
             "a child must be cut from a model or from an earlier child")

    # -- shapes -----------------------------------------------------------------------------
    shapes = {k: v for k, v in resolve.shapes(spec, cps).items() if k not in dupes}
    for c in spec.children:
        src = resolve.lookup(c.prune_from, cps)
        source = shapes.get(src.model or src.child) if src else None
        if source is None:
            continue
        target = shapes.get(c.name)
        at = c.shape.at
        for axis, value in c.shape.explicit.items():
            if axis != "tied_embeddings" and value > getattr(source, axis):
                diag("CSC207", f"child '{c.name}' grows {axis} from {getattr(source, axis)} to {value}",
                     (*at, axis), f"pruning only shrinks; set {axis} <= {getattr(source, axis)} or leave it out")
            if axis == "tied_embeddings" and source.tied_embeddings and not value:
                diag("CSC207", f"child '{c.name}' unties embeddings that are tied in '{c.prune_from}'",
                     (*at, axis), "an untied head cannot be cut from a tied one; remove `tied_embeddings: false`")
        if c.shape.params is not None:
            if target is None:
                diag("CSC213", f"no shape of '{c.name}' within {c.shape.tolerance:.0%} of "
                     f"{c.shape.params:,} parameters (source has {param_count(source):,})", (*at, "params"),
                     _reachable_help(c, source))
            elif c.shape.params > param_count(source):
                diag("CSC207", f"child '{c.name}' targets {c.shape.params:,} parameters, more than its source's {param_count(source):,}",
                     (*at, "params"), "a child must be smaller than what it is cut from")
        if target is None:
            continue
        for problem, fix in config_errors(target):
            key = next((k for k in ("hidden", "heads") if k in c.shape.explicit), "params" if c.shape.params else None)
            diag("CSC230", f"child '{c.name}': {problem}", (*at, key) if key else at, fix)
        attention = ("heads", "kv_heads", "hidden", "head_dim")
        if any(getattr(target, a) != getattr(source, a) for a in attention):
            _check_heads(diag, {a: getattr(target, a) for a in attention}, at, written=c.shape.explicit)
        method = resolve.methods(c, source, target)[0]["heads"]
        if method == "none":
            diag("CSC219", f"child '{c.name}' changes attention heads but `pruning.heads` is none", (*c.at, "pruning", "heads"),
                 "remove `heads: none` (the default prunes query heads within groups, or whole KV groups when "
                 "kv_heads shrink), or keep the source's heads")
        elif method == "query" and target.kv_heads != source.kv_heads:
            diag("CSC219", f"child '{c.name}' changes kv_heads, which `pruning.heads: query` keeps", (*c.at, "pruning", "heads"),
                 "use `pruning: {heads: kv_groups}` to drop whole KV groups")
        shrinks = [a for a in ("layers", "hidden", "ffn") if getattr(target, a) < getattr(source, a)]
        if shrinks and c.calibration["calibration.data"] is None:
            diag("CSC219", f"child '{c.name}' is pruned ({', '.join(shrinks)}) but no calibration data is named",
                 (*c.at, "pruning"), "add `pruning: {calibration: {data: <a data source>}}` or `defaults: {calibration: {data: ...}}`")
        check_data(c.calibration["calibration.data"], (*c.at, "pruning", "calibration", "data"), "calibration")
        mixed(c.calibration["calibration.data"], (*c.at, "pruning", "calibration", "data"), f"calibration of '{c.name}'")
        removed = 1 - param_count(target) / param_count(source)
        if removed > 0.5:
            diag("CSC220", f"child '{c.name}' removes {removed:.0%} of the parameters of '{c.prune_from}' in one step",
                 at, "Minitron and ModelOpt advise iterating at ~30% per step: add an intermediate child",
                 severity="warning")

    # -- trainings: references, teachers, budgets ---------------------------------------------
    shares = []
    refs_seen: dict = {}
    for *_, ref in resolve.trainings(spec):
        refs_seen[ref] = refs_seen.get(ref, 0) + 1
    for c, variant, t, ref in resolve.trainings(spec):
        check_data(t.data, (*t.at, "data"), t.kind)
        start = resolve.starts(c)[ref]
        if start is None:
            diag("CSC218", f"the first step of variant '{variant}' of '{c.name}' does not say where it starts",
                 t.at, f"add `from:` (e.g. `from: {c.phases[-1].name}`, the long-context base)")
        else:
            cp = resolve.lookup(start, cps, c)
            if cp is None:
                unknown("CSC204", "checkpoint", start, (*t.at, "from"), child=c)
            elif cp.order >= cps[ref].order and refs_seen[ref] == 1:
                diag("CSC218", f"'{ref}' starts from '{start}', which comes after it", (*t.at, "from"),
                     "start from an earlier phase or step")
        student = shapes.get(c.name)
        if t.teacher is not None:
            tcp = resolve.lookup(t.teacher, cps, c)
            if tcp is None:
                unknown("CSC202", "teacher", t.teacher, (*t.at, "teacher"), child=c)
            else:
                teacher = shapes.get(tcp.model or tcp.child)
                if teacher is not None and student is not None:
                    if teacher.vocab != student.vocab:
                        diag("CSC210", f"teacher '{t.teacher}' has a vocabulary of {teacher.vocab:,} but student "
                             f"'{c.name}' has {student.vocab:,}", (*t.at, "teacher"),
                             "logit distillation needs one tokenizer; pick a teacher of the same vocabulary")
                    elif param_count(teacher) < param_count(student):
                        diag("CSC214", f"teacher '{t.teacher}' ({param_count(teacher):,} parameters) is smaller than "
                             f"its student '{c.name}' ({param_count(student):,})", (*t.at, "teacher"),
                             "distillation usually needs a larger teacher", severity="warning")
        elif t.kind == "distill":
            diag("CSC202", "a distillation phase needs a teacher", t.at, "add `teacher: <model>`")
        if t.kind in ("distill", "sft", "dpo") and t.tokens is None:
            diag("CSC222", f"{t.kind} '{ref}' has no token budget", t.at, "add `tokens: 250B` (or a share such as `30%`)")
        if t.kind in ("distill", "sft", "dpo") and not t.seq_len:
            diag("CSC222", f"{t.kind} '{ref}' has no sequence length", t.at, "add `seq_len: 4096`")
        if t.kind in ("odpo", "grpo"):
            if t.prompts is None:
                diag("CSC222", f"{t.kind} '{ref}' has no prompt budget", t.at, "add `prompts: 100K`")
            judges = [t.options["judge"]] if "judge" in t.options else list(t.options.get("rewards", []))
            if not judges:
                diag("CSC222", f"{t.kind} '{ref}' names no {'judge' if t.kind == 'odpo' else 'rewards'}", t.at,
                     "add `judge: <name>`" if t.kind == "odpo" else "add `rewards: [<judge>, ...]`")
            for j in judges:
                if j not in spec.judges:
                    unknown("CSC217", "judge", j, (*t.at, "judge" if "judge" in t.options else "rewards"), sorted(spec.judges))
                elif t.kind == "odpo" and spec.judges[j].kind not in PAIRWISE:
                    diag("CSC304", f"odpo '{ref}' is judged by '{j}', a {spec.judges[j].kind} reward; odpo needs a "
                         f"pairwise judge", (*t.at, "judge"),
                         f"name a judge of kind {', '.join(PAIRWISE[:-1])} or {PAIRWISE[-1]}; {spec.judges[j].kind} scores "
                         "one answer (grpo), a compare_rewards judge compares two by such rewards")
            if t.kind == "grpo":
                _check_rewards(diag, t, ref, {i: spec.judges[j] for i, j in enumerate(judges) if j in spec.judges})
            elif judges and judges[0] in spec.judges and spec.judges[judges[0]].kind == judging.COMPARE:
                _check_compared(diag, t, ref, spec.judges[judges[0]], spec.judges)
            new = t.settings["generation.max_new_tokens"]
            if t.seq_len and new >= t.seq_len:
                diag("CSC320", f"{t.kind} '{ref}' generates up to {new:,} tokens in a window of seq_len {t.seq_len:,}: "
                     "no room is left for the prompt", t.settings.at.get("generation.max_new_tokens", (*t.at, "seq_len")),
                     "raise `seq_len` to the longest prompt plus `generation.max_new_tokens`, or lower the latter")
            if t.kind == "odpo" and t.settings["generation.samples"] != 2:
                diag("CSC321", f"odpo '{ref}' asks for {t.settings['generation.samples']} samples per prompt; online DPO "
                     "judges one pair", t.settings.at.get("generation.samples", t.at),
                     "set `generation: {samples: 2}` (several samples per prompt are grpo's)")
        _check_grpo(diag, doc, t, ref)
        if isinstance(t.tokens, Share):
            if spec.budget_tokens is None:
                diag("CSC215", f"'{ref}' asks for a share of the family budget, but `budget.tokens` is not set",
                     (*t.at, "tokens"), "add `budget: {tokens: 3T}` at the top level, or give an absolute count")
            else:
                shares.append((t, ref))
        n = resolve.steps(t, spec)
        if n == 0:
            total = resolve.budget(t, spec)
            per = t.settings["batch.global"] if t.kind in ("odpo", "grpo") else t.seq_len * t.settings["batch.global"]
            what = f"{t.prompts:,} prompts" if t.kind in ("odpo", "grpo") else f"{total:,} tokens"
            diag("CSC212", f"{what} give zero steps for '{ref}' ({per:,} per step)",
                 (*t.at, "prompts" if t.kind in ("odpo", "grpo") else "tokens"),
                 "raise the budget or lower `seq_len` / `batch.global`")

    for c, variant, t, ref in resolve.trainings(spec):
        r = resolve.rounding(t, spec)
        if r is not None and (r[0] - r[1]) / r[0] > ROUNDING_WARN:
            asked, trained, per, unit = r
            diag("CSC234", f"'{ref}' trains {trained:,} of the {asked:,} {unit} asked ({(asked - trained) / asked:.1%} "
                 f"fewer): steps round down to whole batches of {per:,}",
                 (*t.at, "prompts" if unit == "prompts" else "tokens"),
                 f"ask for a multiple of {per:,}: {trained:,} or {trained + per:,} {unit}", severity="warning")

    total = 0
    for t, ref in shares:
        total += t.tokens.fraction
        if total > 1:
            diag("CSC211", f"token shares add up to {float(total):.0%} of the family budget at '{ref}'",
                 (*t.at, "tokens"), "shares of `budget.tokens` must not exceed 100%",
                 notes=[f"{r}: {float(x.tokens.fraction):.0%}" for x, r in shares])
            break

    # -- context and RoPE ---------------------------------------------------------------------
    ctx = resolve.contexts(spec, cps)
    for c, variant, t, ref in resolve.trainings(spec):
        start = resolve.lookup(resolve.starts(c)[ref], cps, c)
        if c.name in dupes or start is None or not t.seq_len:
            continue
        before = ctx.get(start.ref)
        rope, written = t.options.get("rope"), t.options.get("max_position_embeddings")
        if rope is None and written is None:
            if before is not None and t.seq_len > before:
                factor = t.seq_len / before
                fix = (f"extend the context in this phase: add `max_position_embeddings: {t.seq_len}` and `rope: "
                       f"{{rope_type: yarn, factor: {factor:g}, original_max_position_embeddings: {before}}}`, "
                       if variant is None else "extend the context in a long-context phase first, ")
                diag("CSC231", f"'{ref}' trains on {t.seq_len:,}-token sequences, but '{start.ref}' has "
                     f"{before:,} positions (max_position_embeddings) and no rope scaling is set",
                     (*t.at, "seq_len"), fix + f"or lower seq_len to {before:,}")
        else:
            after = ctx[ref]
            if t.seq_len > after:
                diag("CSC231", f"'{ref}' trains on {t.seq_len:,}-token sequences, longer than the "
                     f"max_position_embeddings {after:,} it writes", (*t.at, "seq_len"),
                     f"set `max_position_embeddings: {t.seq_len}` or lower seq_len to {after:,}")
            if rope is None and before is not None and after > before:
                diag("CSC232", f"'{ref}' raises the context from {before:,} to {after:,} positions without rope "
                     "scaling", (*t.at, "max_position_embeddings"),
                     f"add `rope: {{rope_type: yarn, factor: {after / before:g}, original_max_position_embeddings: "
                     f"{before}}}` (Ministral 3: YaRN factor 16 from 16,384 to 262,144)", severity="warning")
            factor, original = (rope or {}).get("factor"), (rope or {}).get("original_max_position_embeddings")
            if factor and original and original * factor < after:
                diag("CSC232", f"rope factor {factor:g} extends {original:,} positions to {original * factor:,.0f}, "
                     f"short of the {after:,} this phase writes", (*t.at, "rope", "factor"),
                     f"set `factor: {after / original:g}` (max_position_embeddings / original_max_position_embeddings)",
                     severity="warning")
        teacher = resolve.lookup(t.teacher, cps, c)
        if teacher is not None and ctx.get(teacher.ref) is not None and t.seq_len > ctx[teacher.ref]:
            tc = ctx[teacher.ref]
            diag("CSC233", f"teacher '{t.teacher}' has {tc:,} positions but '{ref}' trains on {t.seq_len:,}-token "
                 "sequences", (*t.at, "teacher"),
                 f"the teacher's logits past position {tc:,} are extrapolated: use a teacher with a long enough "
                 f"context, lower seq_len to {tc:,}, or, if the teacher does handle it (rope scaling at inference), "
                 "set its `max_position_embeddings`", severity="warning")

    # -- batches split evenly over devices ---------------------------------------------------
    boots = [(m.bootstrap, f"bootstrap of '{m.name}'") for m in spec.models.values() if m.bootstrap is not None]
    for t, what in boots + [(t, f"'{ref}'") for _, _, t, ref in resolve.trainings(spec)]:
        g, micro, devices = (t.settings[k] for k in ("batch.global", "batch.micro", "resources.devices"))
        keys = ("batch.global", "batch.micro", "resources.devices")
        batch, fix = f"global batch {g}", f"set `batch.global` to a multiple of {micro * devices}"
        if getattr(t, "kind", None) == "grpo":  # its micro batch counts completions: G per prompt
            samples = t.settings["generation.samples"]
            keys, g = (*keys, "generation.samples"), g * samples
            batch = f"global batch {g // samples} prompts x {samples} samples = {g} completions"
            fix = (f"grpo's `batch.micro` counts completions: set `batch.global` x `generation.samples` to a multiple "
                   f"of {micro * devices}")
        if g % (micro * devices):
            set_at = {k: t.settings.at[k] for k in keys if k in t.settings.at}
            # point at the value set closest to this training (the likeliest edit); name the others
            nearest = max(set_at, key=lambda k: (len(set_at[k]), -keys.index(k)), default=None)
            diag("CSC223", f"{what}: {batch} is not a multiple of micro batch {micro} x {devices} devices",
                 set_at[nearest] if nearest else t.at,
                 f"{fix}, or change `batch.micro` or `resources.devices`",
                 notes=[f"{k} = {t.settings[k]} " + (f"is set at {where(set_at[k])} (line {doc.span(set_at[k]).line})"
                                                     if k in set_at else "is the default")
                        for k in keys if k != nearest])

    # -- engines the runtime refuses (docs/runtime.md, Distributed training) -----------------
    # DeepSpeed: Accelerate's engine would need its own accumulation, clipping and ZeRO config
    # plumbing, and nothing here can install or test it; a plan that silently ran it wrong is
    # worse than none. fp16 under FSDP2 would need a sharded gradient scaler reaching the loss's
    # in-forward gradients; bf16 needs none. Each place that writes the value is reported once.
    refused: dict = {}
    for t, what in boots + [(t, f"'{ref}'") for _, _, t, ref in resolve.trainings(spec)]:
        strategy, precision = t.settings["resources.strategy"], t.settings["resources.precision"]
        if strategy == "deepspeed":
            refused.setdefault(("CSC250", t.settings.at.get("resources.strategy", t.at)), what)
        if strategy == "fsdp" and precision == "fp16":
            refused.setdefault(("CSC251", t.settings.at.get("resources.precision", t.at)), what)
    for (code, at), what in refused.items():
        if code == "CSC250":
            diag(code, f"{what}: strategy deepspeed is not supported by the cascadec runtime", at,
                 "use `strategy: fsdp` (FSDP2: parameters, gradients, optimizer state and the teacher sharded "
                 "over the devices); see docs/runtime.md")
        else:
            diag(code, f"{what}: precision fp16 is not supported with strategy fsdp", at,
                 "use `precision: bf16` (no loss scaling needed), or `strategy: ddp` for fp16; see docs/runtime.md")

    # -- devices split evenly over nodes ------------------------------------------------------
    # `accelerate launch --num_machines N` starts devices // N processes per node: 3 devices on 2
    # nodes would train with 2 processes while the plan (batches, estimates) counts 3.
    uneven: dict = {}
    for t, what in boots + [(t, f"'{ref}'") for _, _, t, ref in resolve.trainings(spec)]:
        devices, nodes = t.settings["resources.devices"], t.settings["resources.nodes"]
        if devices % nodes:
            key = "resources.nodes" if "resources.nodes" in t.settings.at else "resources.devices"
            uneven.setdefault(t.settings.at.get(key, t.at), (what, devices, nodes))
    for at, (what, devices, nodes) in uneven.items():
        diag("CSC255", f"{what}: {devices} devices do not split evenly over {nodes} nodes", at,
             f"`resources.devices` counts all nodes together: set it to a multiple of {nodes} "
             f"(e.g. {nodes * max(1, devices // nodes)} for {max(1, devices // nodes)} per node)")

    # -- streamed data fits ------------------------------------------------------------------
    used: dict = {}
    for c, variant, t, ref in resolve.trainings(spec):
        d = spec.data.get(t.data)
        n = resolve.steps(t, spec)
        if d is not None and d.stream and n:
            used[d.name] = used.get(d.name, 0) + n * t.seq_len * t.settings["batch.global"]
            if d.tokens is not None and used[d.name] > d.tokens:
                diag("CSC221", f"streamed data '{d.name}' has {d.tokens:,} tokens but the cascade reads "
                     f"{used[d.name]:,} by '{ref}'", (*t.at, "tokens"),
                     "a stream is read once; lower the budgets or declare more data")
    # -- controls and eval contexts fit their data -------------------------------------------------
    for c in spec.children:
        if "compute-matched" in c.control and c.phases and c.phases[0].data in spec.data and c.phases[0].seq_len:
            _check_compute_matched(diag, spec, cps, c)
    if spec.eval is not None and spec.eval.contexts and spec.eval.tokens < math.lcm(*spec.eval.contexts):
        ev, unit = spec.eval, math.lcm(*spec.eval.contexts)
        what = (f"one sequence of {unit:,}" if len(ev.contexts) == 1 else
                f"{unit:,}, the fewest that every length ({', '.join(f'{n:,}' for n in ev.contexts)}) cuts into whole sequences")
        diag("CSC341", f"eval scores {ev.tokens:,} tokens per checkpoint, fewer than {what}", (*ev.at, "tokens"),
             f"raise `eval.tokens` to a multiple of {unit:,} (each length then scores the same tokens)")
    if spec.eval is not None:
        check_data(spec.eval.data, (*spec.eval.at, "data"), "eval")
        h = spec.eval.harness or {}
        for task in h.get("tasks", ()):
            if "generate" in task:
                check_data(task["data"], (*task["at"], task["generate"]),
                           "task accuracy" if task["generate"] == "tasks" else "eval")
        for i, name in enumerate(h.get("include", ())):
            check_data(name, ("eval", "harness", "include", i), "eval")
    return out


def _check_compute_matched(diag, spec: FamilySpec, cps: dict, c) -> None:
    """CSC340: a compute-matched control reads its first phase's data from the start, as many
    tokens as the child's making spent; a source that declares `tokens` must hold them (each
    source of a mix its share). Undeclared sources are checked by the runtime when it reads."""
    first = c.phases[0]
    per_step = first.seq_len * first.settings["batch.global"]
    need = sum(resolve.lineage(spec, cps, f"{c.name}/{c.phases[-1].name}").values()) // per_step * per_step
    d = spec.data[first.data]
    wants = {d.name: need}
    if d.kind == "mix" and d.mix and all(x in spec.data for x in d.mix):
        wants = {x: n * first.seq_len for x, n in mix.counts(d.mix, need // first.seq_len).items()}
    for name, n in wants.items():
        have = spec.data[name].tokens
        if have is not None and n > have:
            diag("CSC340", f"the compute-matched control of '{c.name}' reads {n:,} tokens of '{name}' from its "
                 f"start (as many as every training '{c.name}/{c.phases[-1].name}' descends from), but '{name}' "
                 f"declares {have:,}", (*c.at, "control"),
                 f"declare more data in '{name}' (`tokens:`), or keep only `control: equal-tokens` for "
                 f"'{c.name}' (docs/plan.md, \"Controls\")")


def _check_against_config(diag, m, arch: dict):
    """An `arch` written beside a local checkpoint must agree with its config.json, axis by axis."""
    path = f"{m.source['path']}/config.json"
    for axis, value in m.arch.axes().items():
        found = getattr(m.config_arch, axis)
        if value == found:
            continue
        at = (*m.at, "arch", axis) if axis in arch else (*m.at, "arch", "preset") if "preset" in arch else (*m.at, "arch")
        told = f"preset {arch['preset']} gives" if axis not in arch and "preset" in arch else "arch says"
        diag("CSC240", f"model '{m.name}': {told} {axis} {value}, but {path} says {found}", at,
             f"the checkpoint decides: remove `arch:` (its config.json is read), or write `{axis}: {found}`")


def _check_heads(diag, arch: dict, at: tuple, written=None):
    """GQA and head_dim rules; ``written``: the keys the user wrote at ``at`` (default: all of ``arch``)."""
    written = arch if written is None else written
    heads, kv = arch.get("heads"), arch.get("kv_heads")
    if heads and kv and heads % kv:
        diag("CSC208", f"{heads} attention heads are not divisible by {kv} kv heads",
             (*at, "kv_heads" if "kv_heads" in written or "heads" not in written else "heads"),
             "grouped-query attention needs heads to be a multiple of kv_heads")
    hidden, head_dim = arch.get("hidden"), arch.get("head_dim")
    if heads and hidden and head_dim is None and hidden % heads:
        diag("CSC209", f"hidden {hidden} is not divisible by {heads} heads, and no head_dim is given",
             (*at, "heads"), f"set `head_dim:` explicitly (e.g. {max(2, hidden // heads // 2 * 2)})")
    if head_dim is not None and head_dim % 2:
        diag("CSC209", f"head_dim {head_dim} is odd; rotary embeddings need an even head_dim",
             (*at, "head_dim"), "use an even head_dim")


def _reachable_help(c, source) -> str:
    """The help of CSC213: the parameter counts the allowed axes really reach (loadable shapes
    only), and the nearest ones to the target."""
    req = c.shape
    lo, hi, below, above = reachable(source, req.params, fixed=req.explicit, axes=req.solve_axes,
                                     multiple_of=req.multiple_of)
    axes = ", ".join(req.solve_axes) or "no axis (every axis is given)"
    if lo is None:
        return f"no loadable shape varies {axes}; allow more axes (`solve.axes`)"
    if req.params < lo:
        return (f"the smallest shape over {axes} has {lo:,} parameters: target at least "
                f"{math.ceil(lo / (1 + req.tolerance)):,}, or allow more axes (`solve.axes`)")
    if req.params > hi:
        return f"the largest shape over {axes} has {hi:,} parameters: target at most {math.floor(hi / (1 - req.tolerance)):,}"
    needed = min(abs(n - req.params) for n in (below, above) if n is not None) / req.params
    return (f"shapes over {axes} have {lo:,} to {hi:,} parameters, but none near the target: the nearest have "
            f"{below:,} and {above:,}; target one of them, raise `solve.tolerance` to {math.ceil(needed * 1000) / 1000:g}, "
            "or allow more axes (`solve.axes`)")


# Which reader keys mean something for which data kind (docs/data.md); the runtime reads exactly these.
READER_KEYS = {
    "field": ("jsonl", "parquet", "dataset"),
    "split": ("builtin", "dataset"),
    "hub": ("dataset",),
    "revision": ("dataset",),
    "subset": ("dataset",),
    "format": ("jsonl", "parquet", "dataset", "builtin"),
    "system": ("jsonl", "parquet", "dataset", "builtin"),
    "tasks": ("builtin",),
    "think": ("builtin",),
    "unfinished": ("builtin",),
    "on_error": ("text", "jsonl", "parquet", "dataset", "tokenized"),
}
BUILTIN_SPLITS = ("train", "heldout")


def _check_reader(diag, d) -> None:
    """CSC280-CSC284: the reader keys of one data source agree with its kind and with each other."""
    for key, kinds in READER_KEYS.items():
        if getattr(d, key) is not None and d.kind not in kinds:
            diag("CSC281", f"data '{d.name}': `{key}` does not apply to kind {d.kind}", (*d.at, key),
                 f"`{key}` is read for kind {', '.join(kinds)}; remove it", key=True)
    if d.kind == "dataset" and bool(d.paths) == bool(d.hub):
        diag("CSC280", f"data '{d.name}' of kind dataset needs exactly one of `paths` and `hub`"
             f"{' (it has both)' if d.paths else ''}", d.at,
             "`paths: [data/my_dataset]` for a directory written by `save_to_disk`, or `hub: owner/name` "
             "(with `revision:`) for a hub dataset in the local Hugging Face cache")
    for key in ("revision", "subset"):
        if d.kind == "dataset" and getattr(d, key) is not None and d.hub is None:
            diag("CSC282", f"data '{d.name}': `{key}` needs `hub`", (*d.at, key),
                 f"a `save_to_disk` directory has no {key}; remove it", key=True)
    if d.kind == "builtin" and d.split is not None and d.split not in BUILTIN_SPLITS:
        diag("CSC283", f"data '{d.name}': builtin split '{d.split}' is not one of {', '.join(BUILTIN_SPLITS)}",
             (*d.at, "split"), "builtin corpora split by file into `train` and `heldout`")
    _check_tasks(diag, d)
    if d.field is not None and d.format not in (None, "text"):
        diag("CSC284", f"data '{d.name}': `field` is for text documents; {d.format} records have fixed fields",
             (*d.at, "field"), "remove `field`; docs/data.md lists the fields of each format", key=True)
    if d.system is not None and d.format in (None, "text"):
        diag("CSC284", f"data '{d.name}': `system` needs `format: chat`, `preference` or `prompts`",
             (*d.at, "system"), "add the format, or remove `system`", key=True)


PAIRWISE = ("pairwise_model", "callable", judging.COMPARE)  # judges that compare two answers (odpo); the others score one
PAIRWISE_OPTIONS = {"pairwise_model": ("template", "batch_size", "temperature"), "callable": ("temperature",),
                    judging.COMPARE: ("temperature",)}
TEMPLATE_HELP = {  # CSC302's help, per kind of template
    "pairwise_model": "the template shows `{{ conversation }}` and the answers `{{ a }}` and `{{ b }}`, and ends where "
                      "the judge answers A or B (docs/runtime.md, \"Preference optimisation\")",
    "rubric_model": "the template shows `{{ response }}` and `{{ criterion }}` (and `{{ conversation }}` or "
                    "`{{ question }}`), and ends where the judge answers Yes or No (docs/rewards.md, \"rubric_model\")",
}
FUNCTION_KINDS = {  # the kinds a Python `function` is, and its contract
    "callable": "a function f(prompts, a, b, **columns) -> P(a beats b) per pair",
    "reward_function": "a function f(prompts, completions, **columns) -> one float or None per completion",
}


def _check_grpo(diag, doc, t, ref: str) -> None:
    """CSC350–CSC354: a step's GRPO settings (cascadec/grpo.py) are given once and can run."""
    if t.kind != "grpo":
        for key in [k for k in (*grpo.STEP_KEYS, "clip") if k in t.options]:
            diag("CSC354", f"`{key}` is a grpo setting; {t.kind} '{ref}' does not use it", (*t.at, key),
                 f"remove `{key}` from this {t.kind} step", key=True)
        return
    clip = t.options.get("clip") or {}
    for side, key in (("low", "epsilon"), ("high", "epsilon_high")):
        if side in clip and key in t.options:
            diag("CSC350", f"grpo '{ref}' sets its {side} ratio clip twice: `clip.{side}` and `{key}`", (*t.at, key),
                 f"keep one spelling: `{key}: {t.options[key]}` (TRL's name) or `clip: {{{side}: {clip[side]}}}`",
                 key=True)
    for key, (setting, spelling) in grpo.ALIASES.items():
        group, name = setting.split(".")
        if key in t.options and (*t.at, group, name) in doc.spans:
            diag("CSC351", f"grpo '{ref}' sets `{key}` (TRL's name) and `{setting}`, one setting twice", (*t.at, key),
                 f"keep one: `{key}: {t.options[key]}` or `{spelling}`", key=True)
    if t.settings["generation.samples"] < 2:
        diag("CSC352", f"grpo '{ref}' draws {t.settings['generation.samples']} sample per prompt: a group of one has "
             "no spread, so every advantage is 0", t.settings.at.get("generation.samples", t.at),
             "set `num_generations: 8` (or `generation: {samples: 8}`); Magistral's groups hold 16 samples")
    if t.options.get("num_iterations", 1) != 1:
        diag("CSC353", f"grpo '{ref}' asks for {t.options['num_iterations']} updates per batch of samples; this runtime "
             "makes one (Magistral: n_batch = n_minibatch, the old policy is the sampling one)",
             (*t.at, "num_iterations"), "set `num_iterations: 1`, or sample more often instead (a smaller `batch.global`)")


def _check_judge(diag, j) -> None:
    """CSC300-CSC303: a judge's own options (`function`, `template`) are what the runtime can use."""
    function, template = j.options.get("function"), j.options.get("template")
    if j.kind in FUNCTION_KINDS and function is None:
        diag("CSC300", f"judge '{j.name}' of kind {j.kind} has no `function`", j.at,
             f'add `function: "my_module:my_{"judge" if j.kind == "callable" else "reward"}"`, '
             f"{FUNCTION_KINDS[j.kind]}")
    elif function is not None and j.kind not in FUNCTION_KINDS:
        diag("CSC301", f"judge '{j.name}': `function` is for judges of kind callable or reward_function, not {j.kind}",
             (*j.at, "function"), "set `kind: callable` (a pairwise judge, odpo) or `kind: reward_function` (a grpo "
             "reward), or remove `function`", key=True)
    elif function is not None and not judging.FUNCTION.match(function):
        diag("CSC301", f"judge '{j.name}': `function` '{function}' is not `module:function`", (*j.at, "function"),
             "write the dotted module path, a colon, then the function name: "
             + ('"my_pkg.rewards:score"' if j.kind == "reward_function" else '"my_pkg.judges:prefer"'))
    if template is not None and j.kind not in judging.TEMPLATES:
        diag("CSC302", f"judge '{j.name}': `template` is the prompt of a pairwise_model or rubric_model judge, "
             f"not of {j.kind}", (*j.at, "template"), "remove `template`", key=True)
    elif template is not None and (error := judging.template_error(template, j.kind)):
        diag("CSC302", f"judge '{j.name}': bad `template`: {error}", (*j.at, "template"), TEMPLATE_HELP[j.kind])
    if j.kind in FUNCTION_KINDS and j.model is not None:
        diag("CSC303", f"judge '{j.name}' of kind {j.kind} takes no `model`", (*j.at, "model"),
             f"a {j.kind} judge loads what it needs itself; remove `model`", key=True)
    elif j.kind == judging.COMPARE and j.model is not None:
        diag("CSC303", f"judge '{j.name}' of kind {j.kind} takes no `model`", (*j.at, "model"),
             "it compares the totals of its `rewards`; remove `model`", key=True)


def _check_compare(diag, unknown, j, judges: dict) -> None:
    """CSC305-CSC307: `rewards` belongs to a compare_rewards judge, which names at least one reward,
    each a judge that scores one answer (no pairwise judge, no nesting)."""
    names = j.options.get("rewards")
    if j.kind != judging.COMPARE:
        if names is not None:
            diag("CSC307", f"judge '{j.name}': `rewards` lists what a compare_rewards judge totals; a {j.kind} judge "
                 "takes none", (*j.at, "rewards"), "set `kind: compare_rewards`, or remove `rewards` (a grpo step "
                 "names its rewards on the step)", key=True)
        return
    kinds = ", ".join(judging.COMPARABLE)
    if not names:
        diag("CSC305", f"judge '{j.name}' of kind compare_rewards names no rewards",
             j.at if names is None else (*j.at, "rewards"),
             f"add `rewards: [<judge>, ...]`, judges of kind {kinds}; P(a beats b) = sigmoid((R_a - R_b)/T) "
             "over their weighted total")
        return
    for i, name in enumerate(names):
        r = judges.get(name)
        if r is None:
            unknown("CSC217", "judge", name, (*j.at, "rewards", i), sorted(judges))
        elif r.kind not in judging.COMPARABLE:
            diag("CSC306", f"judge '{j.name}' totals '{name}', a {r.kind} judge; compare_rewards totals rewards that "
                 "score one answer each", (*j.at, "rewards", i),
                 f"name judges of kind {kinds}; a pairwise judge cannot be one of them (no nesting)")


def _check_reward_options(diag, j) -> None:
    """CSC331, CSC332, CSC335: a judge's reward options belong to its kind and hold together."""
    for key in j.options:
        owners = [k for k, opts in (*rewarding.OPTIONS.items(), *PAIRWISE_OPTIONS.items()) if key in opts]
        if key == "weight" and j.kind not in owners:
            diag("CSC331", f"judge '{j.name}': `weight` is a grpo reward's, and a {j.kind} judge is not one",
                 (*j.at, key), "remove `weight`; a pairwise judge compares two answers (odpo), it is not summed", key=True)
        elif key not in ("function", "weight", "template") and owners and j.kind not in owners:
            diag("CSC331", f"judge '{j.name}': `{key}` is an option of {' and '.join(owners)} judges, not of {j.kind}",
                 (*j.at, key), f"remove `{key}`, or set `kind: {owners[0]}`", key=True)
    o = j.options
    if j.kind == "length" and isinstance(o.get("max_tokens"), int) and isinstance(o.get("cache_tokens"), int) \
            and o["cache_tokens"] > o["max_tokens"]:
        diag("CSC332", f"judge '{j.name}': cache_tokens {o['cache_tokens']:,} exceeds max_tokens {o['max_tokens']:,}",
             (*j.at, "cache_tokens"), "cache_tokens is the band below max_tokens over which the penalty grows "
             "from 0 to -1; make it at most max_tokens")
    answers = o.get("answers")
    if j.kind == "rubric_model" and isinstance(answers, list) and len(answers) == 2 \
            and (answers[0] == answers[1] or not all(isinstance(a, str) and a.strip() for a in answers)):
        diag("CSC335", f"judge '{j.name}': `answers` {answers!r} are not two different words", (*j.at, "answers"),
             "give the word the judge writes when the response meets the criterion, then the one when it does not, "
             f"each as the judge's tokenizer spells it after `Answer:` (default {list(judging.RUBRIC_ANSWERS)!r})")


def _check_rewards(diag, t, ref: str, judges: dict) -> None:
    """CSC330, CSC333: each grpo reward (position in `rewards` -> judge) scores one answer, and a
    length penalty can apply."""
    for i, j in judges.items():
        if j.kind not in rewarding.OPTIONS:
            diag("CSC330", f"grpo '{ref}' is rewarded by '{j.name}', a {j.kind} judge; a grpo reward scores "
                 f"one answer", (*t.at, "rewards", i), f"name judges of kind {', '.join(rewarding.REWARD_KINDS)}; "
                 f"{j.kind} judges compare two answers (odpo)")
        else:
            _check_length(diag, t, ref, j, (*t.at, "rewards", i))


def _check_compared(diag, t, ref: str, judge, judges: dict) -> None:
    """CSC309, CSC333: the rewards an odpo step's compare_rewards judge totals can tell its answers
    apart: a length penalty can apply, and a format gate that wants `<think>` does not see answers
    whose thinking the step strips (it would fail both answers of every pair: all ties)."""
    for i, name in enumerate(judge.options.get("rewards") or ()):
        r = judges.get(name)
        if r is None or r.kind not in judging.COMPARABLE:
            continue  # reported with the judge (CSC217, CSC306)
        _check_length(diag, t, ref, r, (*judge.at, "rewards", i))
        if r.kind == "format" and t.options.get("strip_thinking") and r.options.get("think", True) is True:
            diag("CSC309", f"odpo '{ref}' strips the thinking before judging, so the format gate '{name}' of judge "
                 f"'{judge.name}' (think: true) never sees a `<think>` block: every answer fails it and every pair "
                 "ties", (*t.at, "strip_thinking"), f"set `think: false` on '{name}' (the answer alone is "
                 "checked), or `strip_thinking: false` on the step (the rewards read past `</think>` themselves)")


def _check_length(diag, t, ref: str, j, at) -> None:
    """CSC333 (a warning): a length penalty starts past the step's longest completion."""
    if j.kind != "length":
        return
    config, _ = rewarding.resolve(j.kind, j.options, t.settings["generation.max_new_tokens"])
    longest = t.settings["generation.max_new_tokens"]
    if isinstance(config["max_tokens"], int) and isinstance(config["cache_tokens"], int) \
            and config["max_tokens"] - config["cache_tokens"] >= longest:
        diag("CSC333", f"the length penalty '{j.name}' starts at {config['max_tokens'] - config['cache_tokens']:,} "
             f"tokens, but {t.kind} '{ref}' generates at most {longest:,} (generation.max_new_tokens): it never "
             f"applies", at, f"lower max_tokens of '{j.name}' to at most {longest:,} (its "
             f"default), or raise generation.max_new_tokens", severity="warning")


def _check_tasks(diag, d) -> None:
    """CSC360-CSC361: the settings of a `builtin: tasks` source, and keys only it reads."""
    if d.kind != "builtin":
        return
    if d.builtin != "tasks":
        for key in ("tasks", "think", "unfinished", "format", "system"):
            if getattr(d, key) is not None and not (key == "format" and d.format == "text"):
                diag("CSC361", f"data '{d.name}': `{key}` is for `builtin: tasks`; builtin {d.builtin} is text "
                     "documents", (*d.at, key), f"remove `{key}`, or generate tasks with `builtin: tasks`", key=True)
        return
    for i, name in enumerate(d.tasks or ()):
        if name not in BUILTIN_TASKS:
            hint = did_you_mean(name, BUILTIN_TASKS)
            diag("CSC360", f"data '{d.name}': unknown task '{name}'", (*d.at, "tasks", i),
                 (hint + " " if hint else "") + f"the built-in tasks are {', '.join(BUILTIN_TASKS)}")


# The record format each reader of a data source expects (docs/data.md).
READS = {"distill": "text", "bootstrap": "text", "calibration": "text", "eval": "text",
         "sft": "chat", "dpo": "preference", "odpo": "prompts", "grpo": "prompts",
         "task accuracy": "prompts"}


def _check_format(diag, d, at, reader: str) -> None:
    """CSC285: a stage reads a source whose records are not the format it needs (a mix is checked
    where it is made; `builtin: tasks` makes records in its `format`, `builtin: stdlib` is text)."""
    wants, has = READS.get(reader), d.format or "text"
    if reader == "sft" and d.kind == "mix":
        diag("CSC310", f"sft packs the conversations of one chat source, but data '{d.name}' is a mix", at,
             "point `data` at one chat source; several files go in its `paths` (docs/runtime.md, SFT)")
        return
    if wants is None or d.kind == "mix" or has == wants:
        return
    fix = "remove its `format`" if wants == "text" else f"give it `format: {wants}`"
    help = f"point `data` at a {wants} source, or {fix} if its records are {wants} (docs/data.md)"
    if d.kind == "builtin" and d.builtin != "tasks":  # stdlib is text; the tasks make any format
        help = f"point `data` at a {wants} source, e.g. {{kind: builtin, builtin: tasks, format: {wants}}} (docs/data.md)"
    diag("CSC285", f"{reader} reads {wants} records, but data '{d.name}' holds {has} records", at, help)
