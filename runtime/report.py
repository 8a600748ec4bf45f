"""The family report: one table per child (parameters, tokens, held-out loss beside the parent's,
the freshly pruned model's and the from-scratch controls' (equal tokens, compute-matched)), the
held-out loss of every checkpoint at each eval context length, loss curves per training stage, the
post-training variants (held-out task accuracy base → SFT → GRPO → ODPO beside the parent, judge
win rates, GRPO reward curves), the DAG as Mermaid, and the plan's estimates beside what the run
really spent.

Reads a workspace (eval.json, metrics.jsonl and manifest.json of each stage) and the plan; it
trains nothing. Used by the `report` stage and by `cascadec report`.
"""

from __future__ import annotations

import json
from pathlib import Path

from cascadec.draw import mermaid
from cascadec.text import si

TRAINING = ("bootstrap", "distill", "control", "sft", "dpo", "odpo", "grpo")
POST_TRAINING = ("sft", "dpo", "odpo", "grpo")  # a variant's steps: <kind>/<child>/<variant>/<step>
PREFERENCE = ("dpo", "odpo", "grpo")  # their loss is a policy objective, not a next-token loss


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def collect(plan: dict, workdir: Path) -> dict:
    """Everything the report shows, as plain data (this is also `--format json`)."""
    workdir = Path(workdir)
    stages = {s["id"]: s for s in plan["stages"]}
    losses, benchmarks, contexts, scored = {}, {}, {}, {}
    for sid, s in stages.items():
        if s["kind"] == "eval":
            ev = _read_json(workdir / "stages" / sid / "eval.json")
            for name, r in ((ev or {}).get("checkpoints") or {}).items():
                losses[name] = r["loss"]
                if r.get("contexts"):
                    contexts[name] = r["contexts"]
                if r.get("harness"):
                    benchmarks[name] = {task: headline(m) for task, m in r["harness"].items()}
                    scored[name] = r["harness"]
    children = []
    for name, m in plan["models"].items():
        if m["role"] != "child":
            continue
        phases = [s for s in plan["stages"] if s["kind"] == "distill" and s["id"].split("/")[1] == name]
        final = f"{name}/{phases[-1]['config']['phase']}" if phases else None
        root = m["prune_from"]
        while plan["models"].get(root.split("/")[0], {}).get("role") == "child":
            root = plan["models"][root.split("/")[0]]["prune_from"]
        parent, pruned, ours, control, matched = (losses.get(k) for k in (
            root, f"{name}/pruned", final, f"{name}/control/equal-tokens", f"{name}/control/compute-matched"))
        matched_stage = stages.get(f"control/{name}/compute-matched")
        recovered = None
        if None not in (parent, pruned, ours) and pruned != parent:
            recovered = round((pruned - ours) / (pruned - parent), 4)
        children.append({
            "child": name, "params": m["params"], "prune_from": m["prune_from"], "root": root,
            "tokens": sum(s["config"]["tokens"] for s in phases),
            "loss": ours, "loss_short": losses.get(f"{name}/{phases[0]['config']['phase']}") if phases else None,
            "parent_loss": parent, "pruned_loss": pruned, "control_loss": control,
            "beats_control": None if None in (ours, control) else ours < control,
            "matched_loss": matched, "matched_tokens": matched_stage["config"]["tokens"] if matched_stage else None,
            "beats_matched": None if None in (ours, matched) else ours < matched,
            "gap_recovered": recovered,
        })
    spent = []
    for sid, s in stages.items():
        man = _read_json(workdir / "stages" / sid / "manifest.json") or {}
        spent.append({"stage": sid, "kind": s["kind"], "planned_tokens": s["estimate"]["tokens"],
                      "planned_device_hours": s["estimate"]["device_hours"],
                      "tokens": man.get("tokens_seen"), "wall_time_s": man.get("wall_time_s"),
                      "done": bool(man)})
    pruning = []
    for sid, s in stages.items():
        if s["kind"] == "prune":
            man = _read_json(workdir / "stages" / sid / "manifest.json") or {}
            pruning.append({"stage": sid, "methods": {a: m for a, m in s["config"]["methods"].items() if m},
                            **((man.get("metrics") or {}).get("reconstruction") or {})})
    curves = {sid: [(r.get("tokens"), r.get("loss")) for r in _metrics(workdir / "stages" / sid / "metrics.jsonl")]
              for sid, s in stages.items() if s["kind"] in TRAINING}
    mixes = []  # stages that read a weighted mix: planned and read tokens per source
    for sid, s in stages.items():
        sources = ((s.get("config") or {}).get("data") or {}).get("sources")
        if sources:
            read = ((_read_json(workdir / "stages" / sid / "manifest.json") or {}).get("metrics") or {}).get("source_tokens") or {}
            mixes.append({"stage": sid, "data": s["config"]["data"]["name"],
                          "sources": {k: {"planned": w["tokens"], "offset": w["offset"], "read": read.get(k)}
                                      for k, w in sorted(sources.items())}})
    return {"family": plan["family"], "spec_sha256": plan["spec_sha256"], "children": children,
            "losses": losses, "contexts": contexts, "benchmarks": benchmarks, "stages": spent, "pruning": pruning,
            "curves": {k: v for k, v in curves.items() if v}, "mixes": mixes, "totals": plan["totals"],
            "task_order": _task_order(plan), **variants(plan, workdir, children, scored)}


def variants(plan: dict, workdir: Path, children: list[dict], scored: dict) -> dict:
    """The post-training view: per child, its base checkpoint then every variant's steps in order,
    with held-out task accuracy (the first `{tasks: DATA}` harness task: greedy accuracy, pass@1,
    pass@k, mean length, loop rate, accuracy per task), the odpo judge's win rate and the grpo
    reward's first and last steps; the root parent's accuracy beside them; reward and win-rate
    curves per stage."""
    from .evaluation.harness import task_name

    accuracy_tasks = [task_name(t) for s in plan["stages"] if s["kind"] == "eval"
                      for t in ((s.get("config") or {}).get("harness") or {}).get("tasks", []) if t.get("generate") == "tasks"]
    task = next(iter(dict.fromkeys(accuracy_tasks)), None)
    posts = [s for s in plan["stages"] if s["kind"] in POST_TRAINING]
    if not posts:
        return {"variants": [], "accuracy_task": task, "reward_curves": {}, "win_rate_curves": {}}

    def scores(checkpoint: str) -> dict | None:
        return (scored.get(checkpoint) or {}).get(task) if task else None

    rows, rewards, wins = [], {}, {}
    for c in children:
        name, final = c["child"], None
        phases = [s for s in plan["stages"] if s["kind"] == "distill" and s["id"].split("/")[1] == name]
        if phases:
            final = f"{name}/{phases[-1]['config']['phase']}"
        mine = [s for s in posts if s["id"].split("/")[1] == name]
        if not mine:
            continue
        rows.append({"child": name, "variant": "parent", "step": c["root"], "kind": None, "checkpoint": c["root"],
                     "accuracy": scores(c["root"])})
        rows.append({"child": name, "variant": "base", "step": final.split("/", 1)[1] if final else None,
                     "kind": "distill", "checkpoint": final, "accuracy": scores(final) if final else None})
        # the spec's order (instruct before reasoning, steps in turn): the child's eval lists them so
        listed = next((s["config"]["checkpoints"] for s in plan["stages"] if s["id"] == f"eval/{name}"), [])
        rank = {n: i for i, n in enumerate(listed)}
        mine.sort(key=lambda s: rank.get(s["id"].split("/", 1)[1], len(rank)))
        order = list(dict.fromkeys(s["id"].split("/")[2] for s in mine))
        for variant in order:
            for s in (s for s in mine if s["id"].split("/")[2] == variant):
                checkpoint = s["id"].split("/", 1)[1]
                folder = workdir / "stages" / s["id"]
                result = (_read_json(folder / "manifest.json") or {}).get("metrics") or {}
                lines = _metrics(folder / "metrics.jsonl")
                row = {"child": name, "variant": variant, "step": checkpoint.rsplit("/", 1)[1], "kind": s["kind"],
                       "checkpoint": checkpoint, "accuracy": scores(checkpoint)}
                if s["kind"] == "odpo":
                    row["win_rate"], row["win_rate_start"] = result.get("win_rate"), result.get("win_rate_start")
                    wins[s["id"]] = [(r["step"], r["win_rate"]) for r in lines if r.get("win_rate") is not None]
                if s["kind"] == "grpo":
                    curve = [(r["step"], r["reward_mean"]) for r in lines if r.get("reward_mean") is not None]
                    rewards[s["id"]] = curve
                    if curve:
                        head, tail = curve[:max(1, len(curve) // 5)], curve[-max(1, len(curve) // 5):]
                        row["reward_start"] = round(sum(v for _, v in head) / len(head), 4)
                        row["reward_end"] = round(sum(v for _, v in tail) / len(tail), 4)
                rows.append(row)
    return {"variants": rows, "accuracy_task": task, "reward_curves": {k: v for k, v in rewards.items() if v},
            "win_rate_curves": {k: v for k, v in wins.items() if v}}


def _task_order(plan: dict) -> list[str]:
    """Harness task names in the order the spec lists them (`eval.harness.tasks`)."""
    from .evaluation.harness import task_name

    names = [task_name(t) for s in plan["stages"] if s["kind"] == "eval"
             for t in ((s.get("config") or {}).get("harness") or {}).get("tasks", [])]
    return list(dict.fromkeys(names))


HEADLINE = ("acc_norm", "acc", "exact_match", "bits_per_byte")  # the metric a task is reported by


def headline(metrics: dict) -> dict:
    """``{"metric": name, "value": x}``: the first of HEADLINE a task reports, else its first metric."""
    name = next((m for m in HEADLINE if m in metrics), next(iter(metrics), None))
    return {"metric": name, "value": metrics.get(name)}


def plots(data: dict, out: Path) -> list[str]:
    """PNG plots (matplotlib, headless): loss curves per training stage; held-out losses per child."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if data["curves"]:
        # KL to the teacher and next-token cross-entropy are different quantities: two panels.
        panels = (("distill", "distillation loss (KL to the teacher)"), ("", "next-token loss (cross-entropy)"))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, (prefix, title) in zip(axes, panels):
            for sid, points in sorted(data["curves"].items()):
                if sid.startswith("distill/") != bool(prefix) or sid.split("/")[0] in PREFERENCE:
                    continue  # a preference or policy loss is no cross-entropy: reward_curves.png has those stages
                kept = [p for p in points if p[1] is not None]
                ax.plot([p[0] for p in kept], [p[1] for p in kept], label=sid, linewidth=1)
            ax.set_xlabel("tokens into the stage")
            ax.set_yscale("log")
            ax.set_title(title)
            if ax.lines:
                ax.legend(fontsize=7)
        fig.suptitle(f"{data['family']}: training loss per stage")
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
        written.append("loss_curves.png")
    rows = [c for c in data["children"] if c["loss"] is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [("parent", "parent_loss"), ("pruned", "pruned_loss"), ("distilled", "loss"),
                  ("control, equal tokens", "control_loss"), ("control, compute-matched", "matched_loss")]
        width = 0.16
        for i, (label, key) in enumerate(labels):
            ax.bar([j + (i - 2) * width for j in range(len(rows))], [r.get(key) or 0 for r in rows], width, label=label)
        ax.set_xticks(range(len(rows)), [f"{r['child']}\n{si(r['params'])}" for r in rows])
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"{data['family']}: held-out loss per child")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "family.png", dpi=110)
        plt.close(fig)
        written.append("family.png")
    if data.get("reward_curves") or data.get("win_rate_curves"):
        panels = [(k, t) for k, t in (("reward_curves", "grpo: mean reward per step"),
                                      ("win_rate_curves", "odpo: win rate against the starting policy"))
                  if data.get(k)]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            for sid, points in sorted(data[key].items()):
                ax.plot([p[0] for p in points], [p[1] for p in points], label=sid, linewidth=1,
                        marker="o" if key == "win_rate_curves" else None, markersize=3)
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.suptitle(f"{data['family']}: post-training curves")
        fig.tight_layout()
        fig.savefig(out / "reward_curves.png", dpi=110)
        plt.close(fig)
        written.append("reward_curves.png")
    tasks = _tasks(data)
    if tasks:
        names = list(data["benchmarks"])
        fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 4.5 * len(tasks)), 4.8), squeeze=False)
        for ax, (task, metric) in zip(axes[0], tasks):
            values = [(data["benchmarks"][n].get(task) or {}).get("value") for n in names]
            ax.bar(range(len(names)), [v or 0 for v in values])
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{task} ({metric})", fontsize=9)
        fig.suptitle(f"{data['family']}: benchmarks per checkpoint")
        fig.tight_layout()
        fig.savefig(out / "benchmarks.png", dpi=110)
        plt.close(fig)
        written.append("benchmarks.png")
    return written


def _tasks(data: dict) -> list[tuple[str, str]]:
    """(task, headline metric) of every task any checkpoint was scored on, in the spec's order."""
    seen = {}
    for row in data.get("benchmarks", {}).values():
        for task, h in row.items():
            seen.setdefault(task, h["metric"])
    order = data.get("task_order") or []
    return sorted(seen.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def _f(x, fmt="{:.4f}") -> str:
    return "–" if x is None else fmt.format(x)


def _yes(x) -> str:
    return "–" if x is None else ("yes" if x else "**no**")


def context_cell(score: dict | None) -> str:
    """One held-out loss at one context; † where the checkpoint never trained that long."""
    if not score:
        return "–"
    return f"{score['loss']:.4f}{' †' if score.get('beyond_trained') else ''}"


def _context_table(data: dict) -> list[str]:
    """Held-out loss of every checkpoint at each context length the eval stages scored."""
    if not data.get("contexts"):
        return []
    lengths = sorted({int(n) for row in data["contexts"].values() for n in row})
    lines = ["## Held-out loss by context length", "",
             "| checkpoint | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
             "| --- | " + " | ".join("---:" for _ in lengths) + " |"]
    for name, row in data["contexts"].items():
        lines.append(f"| {name} | " + " | ".join(context_cell(row.get(str(n))) for n in lengths) + " |")
    return lines + ["", "The same first held-out tokens, cut into sequences of each length: a longer context "
                    "gives every predicted token more history. † marks a length longer than any sequence the "
                    "checkpoint (or the checkpoints it descends from) was trained on: scored all the same, that "
                    "is what a long-context phase is for.", ""]


def _pass_at(metrics: dict) -> tuple[str | None, float | None]:
    """(name, value) of the pass@k a task accuracy row reports (k > 1)."""
    name = next((m for m in metrics if m.startswith("pass@") and m != "pass@1"), None)
    return name, metrics.get(name) if name else None


def _variant_tables(data: dict, images: list[str]) -> list[str]:
    """Per child: parent, base, then each variant's steps: task accuracy, length, loops, win rate, reward."""
    rows = data.get("variants") or []
    if not rows:
        return []
    k = next((_pass_at(r["accuracy"])[0] for r in rows if r.get("accuracy")), None) or "pass@k"
    lines = ["## Post-training: instruct and reasoning variants", "",
             f"Held-out task accuracy (`{data.get('accuracy_task') or 'none'}`): greedy answers, and "
             f"{k} / pass@1 from sampled ones (unbiased estimator); mean length in generated tokens and loop rate of "
             "the greedy answers. Win rate: the odpo judge's P(policy ≻ starting policy) on prompts held out of "
             "training, before → after. Reward: grpo's mean reward over its first → last fifth of steps.", "",
             f"| child | variant | step | accuracy (greedy) | {k} | pass@1 | mean length | loop rate | "
             "judge win rate | reward |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r.get("accuracy") or {}
        win = "–" if r.get("win_rate") is None else f"{_f(r.get('win_rate_start'), '{:.2f}')} → {r['win_rate']:.2f}"
        reward = "–" if r.get("reward_end") is None else f"{r['reward_start']:.3f} → {r['reward_end']:.3f}"
        lines.append(f"| {r['child']} | {r['variant']} | {r['step'] or '–'} | {_f(m.get('accuracy'), '{:.2f}')} | "
                     f"{_f(_pass_at(m)[1], '{:.2f}')} | {_f(m.get('pass@1'), '{:.2f}')} | "
                     f"{_f(m.get('length'), '{:.1f}')} | {_f(m.get('loop_rate'), '{:.2f}')} | {win} | {reward} |")
    tasks = list(dict.fromkeys(key.split("/")[0] for r in rows for key in (r.get("accuracy") or {}) if "/" in key))
    if tasks:
        lines += ["", "Greedy accuracy per task:", "",
                  "| child | variant | step | " + " | ".join(tasks) + " |",
                  "| --- | --- | --- | " + " | ".join("---:" for _ in tasks) + " |"]
        for r in rows:
            m = r.get("accuracy") or {}
            lines.append(f"| {r['child']} | {r['variant']} | {r['step'] or '–'} | "
                         + " | ".join(_f(m.get(f"{t}/accuracy"), "{:.2f}") for t in tasks) + " |")
    return lines + [""] + (["![reward curves](reward_curves.png)", ""] if "reward_curves.png" in images else [])


def markdown(data: dict, plan: dict, images: list[str]) -> str:
    lines = [f"# Family report: {data['family']}", "",
             f"Spec sha256 `{data['spec_sha256'][:12]}`. Held-out loss is mean next-token cross-entropy "
             "(nats/token) on the same held-out tokens for every checkpoint.", "",
             "| child | params | distill tokens | held-out loss | after first phase | parent | right after pruning | "
             "control, equal tokens | beats it | control, compute-matched (tokens) | beats it | gap recovered |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | :---: | ---: |"]
    for c in data["children"]:
        matched = _f(c.get("matched_loss")) + (f" ({si(c['matched_tokens'])})" if c.get("matched_tokens") else "")
        lines.append(f"| {c['child']} | {c['params']:,} | {si(c['tokens'])} | {_f(c['loss'])} | {_f(c['loss_short'])} | {_f(c['parent_loss'])} | "
                     f"{_f(c['pruned_loss'])} | {_f(c['control_loss'])} | {_yes(c['beats_control'])} | "
                     f"{matched} | {_yes(c.get('beats_matched'))} | {_f(c['gap_recovered'], '{:.0%}')} |")
    lines += ["", "'held-out loss' is the child's final base checkpoint (its last pretraining phase); the controls "
              "are the child's shape trained from scratch, on its own distillation tokens (equal tokens) or on as "
              "many tokens as the cascade spent to make it, the root's bootstrap included (compute-matched; "
              "docs/plan.md, \"Controls\"); 'gap recovered' = (pruned − final) / (pruned − parent): the share of "
              "the loss that pruning cost which distillation won back.", ""]
    lines += _context_table(data)
    lines += [f"![{Path(i).stem}]({i})" for i in images if i not in ("benchmarks.png", "reward_curves.png")] + [""]
    lines += _variant_tables(data, images)
    tasks = _tasks(data)
    if tasks:
        lines += ["## Benchmarks (lm-evaluation-harness)", "",
                  "| checkpoint | held-out loss | " + " | ".join(f"{task} ({metric})" for task, metric in tasks) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
        for name, row in data["benchmarks"].items():
            cells = [_f((row.get(task) or {}).get("value")) for task, _ in tasks]
            lines.append(f"| {name} | {_f(data['losses'].get(name))} | " + " | ".join(cells) + " |")
        lines += ["", "Every checkpoint the plan scores, through the harness's own task definitions; the "
                  "`cascadec_*` tasks are generated from the spec's data sources (bits per byte: lower is "
                  "better; accuracy: higher is better). All metrics are in each eval stage's eval.json and manifest.",
                  ""] + (["![benchmarks](benchmarks.png)", ""] if "benchmarks.png" in images else [])
    lines += ["## Pruning: how far each cut moved the model", "",
              "| prune stage | methods | KL to source | calibration loss before → after | top-1 agreement |",
              "| --- | --- | ---: | ---: | ---: |"]
    for r in data.get("pruning", []):
        methods = ", ".join(f"{a}: {m}" for a, m in sorted(r["methods"].items())) or "–"
        before_after = "–" if "loss" not in r else f"{r['source_loss']:.3f} → {r['loss']:.3f}"
        agree = "–" if "top1_agreement" not in r else f"{r['top1_agreement']:.1%}"
        lines.append(f"| {r['stage']}{' ⚠' if r.get('warning') else ''} | {methods} | {_f(r.get('kl'))} | "
                     f"{before_after} | {agree} |")
    lines += ["", "KL (nats/token) of the freshly pruned model to the checkpoint it was cut from, on the first "
              "calibration sequences, over the source's top-64 tokens plus the rest (a lower bound of the full "
              "KL); ⚠ marks a cut above the warning threshold (its manifest holds the warning).", ""]
    if data.get("mixes"):
        lines += ["## Data mixes: tokens per source", "",
                  "| stage | mix | source | offset | planned tokens | tokens read |", "| --- | --- | --- | ---: | ---: | ---: |"]
        for m in data["mixes"]:
            for name, w in m["sources"].items():
                lines.append(f"| {m['stage']} | {m['data']} | {name} | {w['offset']:,} | {w['planned']:,} | "
                             f"{'–' if w['read'] is None else format(w['read'], ',')} |")
        lines += ["", "Each source is read once, in consecutive windows (offset = tokens of that source read by "
                  "earlier stages); sequences are interleaved by weight (docs/data.md).", ""]
    lines += ["## Compute: planned and spent", "",
              "| stage | kind | planned tokens | tokens seen | planned device-hours | wall time |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    wall = 0.0
    for s in data["stages"]:
        wall += s["wall_time_s"] or 0
        lines.append(f"| {s['stage']} | {s['kind']} | {si(s['planned_tokens']) if s['planned_tokens'] else '–'} | "
                     f"{si(s['tokens']) if s['tokens'] else '–'} | {_f(s['planned_device_hours'], '{:.4f}')} | "
                     f"{_f(s['wall_time_s'], '{:.1f} s')} |")
    t = data["totals"]
    lines += ["", f"Planned: {si(t['flops'])}FLOPs, {t['device_hours']:,.2f} device-hours on {t['hardware']['device']}. "
              f"Spent: {wall:,.1f} s of wall time over the stages run.", "",
              "Logs: each training stage's per-step metrics are `stages/<stage id>/metrics.jsonl` in the workspace; "
              "TensorBoard event files (written when `tensorboard` is installed) are kept in `logs/<stage id>/`, "
              "outside the stages' scratch: `tensorboard --logdir WORKDIR/logs`.", "", "## Stages", "", "```mermaid",
              mermaid(plan).rstrip(), "```", ""]
    return "\n".join(lines)


def write(plan: dict, workdir: Path, out: Path) -> dict:
    """Write report.md, report.json and the plots into ``out``; return the collected data."""
    out.mkdir(parents=True, exist_ok=True)
    data = collect(plan, workdir)
    images = plots(data, out)
    (out / "report.md").write_text(markdown(data, plan, images))
    (out / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def report_cmd(plan: dict, workdir: str, *, fmt: str = "md") -> int:
    """`cascadec report`: regenerate the report from the workspace as it is now."""
    workdir = Path(workdir)
    if not (workdir / "stages").is_dir():
        print(f"error: no workspace at {workdir}; run `cascadec run` first (or pass --workdir)")
        return 1
    if fmt == "json":
        print(json.dumps(collect(plan, workdir), indent=2, sort_keys=True))
        return 0
    out = workdir / "report"
    write(plan, workdir, out)
    print(f"wrote {out / 'report.md'}")
    return 0
