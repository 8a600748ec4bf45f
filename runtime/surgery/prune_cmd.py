"""`cascadec prune SRC OUT_DIR ...`: calibrate a checkpoint and write its pruned copy.

SRC is a model directory or a hub id `ORG/NAME[@REVISION]` (resolved to its snapshot folder by
`cascadec.hub`, the resolver `cascadec run` uses).

Owns the command's arguments and its error messages; the work is calibrate.py's and prune.py's.
It must never print a traceback or leave a partial OUT_DIR on bad input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from cascadec import hub
from cascadec.shapes import from_hf_config

from . import keep
from .adapters import for_config, read_config
from .keep import SurgeryError

AXES = ("layers", "hidden", "ffn", "heads", "kv_heads")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cascadec prune", description="Prune a Hugging Face checkpoint "
                                "to a smaller shape, choosing what to keep from calibration scores.")
    p.add_argument("src", metavar="SRC", help="Hugging Face model directory, or hub id ORG/NAME[@REVISION]")
    p.add_argument("out", type=Path, metavar="OUT_DIR", nargs="?",
                   help="where to write the pruned model (must not exist; not with --compare)")
    for axis in AXES:
        p.add_argument(f"--{axis.replace('_', '-')}", type=int, metavar="N",
                       help=f"target {axis.replace('_', ' ')} (default: unchanged)")
    p.add_argument("--layer-method", choices=sorted(keep.METHODS["layers"]), default=keep.DEFAULT["layers"],
                   help=f"which layers to drop (default {keep.DEFAULT['layers']}; see --compare)")
    p.add_argument("--hidden-method", choices=sorted(keep.METHODS["hidden"]), default=keep.DEFAULT["hidden"],
                   help=f"how to narrow the residual stream (default {keep.DEFAULT['hidden']})")
    p.add_argument("--compare", action="store_true",
                   help="cut with every layer criterion (and hidden method, when hidden changes), print what each "
                        "drops and costs on the calibration text, and write nothing")
    p.add_argument("--warn-kl", type=float, default=None, metavar="NATS",
                   help="warn when the pruned model's KL to its source on the calibration text exceeds this "
                        "(nats/token, default 1.0)")
    p.add_argument("--tie-embeddings", action="store_true", help="tie the LM head to the input embedding")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="calibration text (.txt), or .jsonl(.gz/.zst) or .parquet with a 'text' field "
                        "(default: Python's stdlib sources)")
    p.add_argument("--samples", type=int, default=64, metavar="N", help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--from-plan", type=Path, metavar="PLAN", help="take target and methods from a plan's prune stage")
    p.add_argument("--stage", metavar="ID", help="the prune stage id (with --from-plan)")
    return p


def request_from_flags(args, source):
    """(target, methods, calibration settings) from command-line flags."""
    target = source.replace(**{a: getattr(args, a) for a in AXES if getattr(args, a) is not None})
    if args.tie_embeddings:
        target = target.replace(tied_embeddings=True)
    heads_change = (target.heads, target.kv_heads) != (source.heads, source.kv_heads)
    methods = {"layers": args.layer_method if target.layers != source.layers else None,
               "hidden": args.hidden_method if target.hidden != source.hidden else None,
               "ffn": keep.DEFAULT["ffn"] if target.ffn != source.ffn else None,
               "heads": keep.DEFAULT["heads"] if heads_change else None}
    from .calibration_text import file_source

    calib = {"source": file_source(args.calibration), "samples": args.samples, "seq_len": args.seq_len,
             "batch_size": args.batch_size, "offset": 0}
    return target, methods, calib


def request_from_plan(args, source):
    """(target, methods, calibration settings) from the plan's prune stage and its calibrate stage.

    The plan's data paths are relative to the spec's directory; here they are resolved against
    the plan file's directory (keep the plan beside the spec), and ``--calibration`` overrides.
    """
    from .prune import plan_target

    if not args.from_plan.is_file():
        raise FileNotFoundError(f"plan {args.from_plan} not found")
    try:
        plan = json.loads(args.from_plan.read_text())
    except json.JSONDecodeError as e:
        raise SurgeryError(f"plan {args.from_plan} is not valid JSON ({e})",
                           "pass the plan.json written by `cascadec plan`") from None
    stages = {s["id"]: s for s in plan.get("stages", [])}
    stage = stages.get(args.stage)
    if stage is None or stage.get("kind") != "prune":
        prunes = ", ".join(i for i, s in stages.items() if s.get("kind") == "prune") or "none"
        raise SurgeryError(f"plan has no prune stage {args.stage!r}", f"prune stages in this plan: {prunes}")
    target, methods = plan_target(stage["config"], source)
    stats_input = next((i for i in stage.get("inputs", []) if i.get("role") == "stats"), {})
    cal = stages.get(stats_input.get("stage"), {}).get("config", {})
    data = plan.get("data", {}).get((cal.get("data") or {}).get("name"))
    if data and data.get("paths"):
        data = {**data, "paths": [str(args.from_plan.parent / p) for p in data["paths"]]}
    if args.calibration:
        from .calibration_text import file_source

        data = file_source(args.calibration)
    calib = {"source": data, "samples": cal.get("samples", args.samples), "seq_len": cal.get("seq_len", args.seq_len),
             "batch_size": cal.get("batch_size", args.batch_size), "offset": (cal.get("data") or {}).get("offset", 0)}
    return target, methods, calib


def model_dir(src: str) -> tuple[Path, bool]:
    """(local directory, whether it came from the hub): ``src`` itself, or the snapshot folder of
    a hub id (downloaded unless cached; HF_HUB_OFFLINE=1 reads the cache only)."""
    if Path(src).exists() or not hub.HUB_ID.fullmatch(src):
        return Path(src), False
    repo, _, revision = src.partition("@")
    m = hub.HubModel(repo, repo, revision or hub.DEFAULT_REVISION)
    return hub.snapshot(m, hub.resolve(m, local_only=False)), True


def run(args) -> None:
    """Check everything that can be checked before calibrating, then calibrate and prune."""
    args.src, from_hub = model_dir(args.src)
    config = read_config(args.src)
    try:
        for_config(config)
    except ValueError as e:
        raise SurgeryError(str(e), "cascadec prunes Llama, Mistral, Ministral3, Qwen2, Qwen3 and "
                           "Mistral 3 (text tower) checkpoints") from None
    source = from_hf_config(config)
    if args.out is not None and args.out.exists():
        raise FileExistsError(f"{args.out} already exists")
    if args.calibration is not None and not args.calibration.is_file():
        raise FileNotFoundError(f"calibration file {args.calibration} not found")
    request = request_from_plan if args.from_plan else request_from_flags
    target, methods, calib = request(args, source)
    candidates = alternatives(methods) if args.compare else [methods]
    if args.compare and len(candidates) == 1:
        raise SurgeryError("--compare needs a target that changes layers or hidden",
                           "give --layers N and/or --hidden N below the source's size")
    for m in candidates:
        keep.check(source, target, m, None)
    scores = keep.scores_for({f"{axis}{i}": method for i, m in enumerate(candidates) for axis, method in m.items()})
    from .calibrate import calibrate

    try:
        stats, summary = calibrate(args.src, scores=scores, angular_block=source.layers - target.layers or None, **calib)
    except ValueError as e:  # too little calibration text
        raise SurgeryError(str(e), "give more calibration text or lower --samples/--seq-len") from None
    from .prune import prune

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    warn = {} if args.warn_kl is None else {"warn_kl": args.warn_kl}
    if not args.compare:
        report = prune(args.src, args.out, stats=stats, target=target, methods=methods, calibration=summary,
                       log=log, **warn)
        print(f"wrote {args.out}: {report['source_params']:,} -> {report['params']:,} parameters")
        return
    rows = []
    # beside the source (same disk), unless that is the hub cache
    with tempfile.TemporaryDirectory(prefix=".cascadec-compare-", dir=None if from_hub else args.src.parent) as tmp:
        for i, m in enumerate(candidates):
            report = prune(args.src, Path(tmp) / str(i), stats=stats, target=target, methods=m, log=log,
                           warn_kl=float("inf"))
            rows.append((m, report))
    print(comparison(rows, source, target))


def alternatives(methods: dict) -> list[dict]:
    """``methods`` with every method of each axis that changes among layers and hidden."""
    axes = [a for a in ("layers", "hidden") if methods.get(a)]
    choices = [sorted(keep.METHODS[a] - keep.ALIASES) for a in axes]
    return [{**methods, **dict(zip(axes, combo))} for combo in itertools.product(*choices)]


def comparison(rows: list[tuple[dict, dict]], source, target) -> str:
    """The --compare table, best (lowest KL to the source) first."""
    rows = sorted(rows, key=lambda r: (r[1]["reconstruction"]["kl"],  # ties: the defaults first
                                       [r[0][a] != keep.DEFAULT[a] for a in ("layers", "hidden") if r[0].get(a)]))
    r0 = rows[0][1]["reconstruction"]
    lines = [f"{source.layers}->{target.layers} layers, hidden {source.hidden}->{target.hidden}, "
             f"{rows[0][1]['source_params']:,} -> {rows[0][1]['params']:,} parameters; "
             f"calibration text: {r0['tokens']:,} tokens, source loss {r0['source_loss']:.3f} nats/token", "",
             f"{'layers':<16} {'hidden':<8} {'KL':>8} {'loss':>8} {'Δloss':>8} {'top-1':>6}  dropped layers"]
    for m, report in rows:
        r, kept = report["reconstruction"], report["kept"]["layers"]["kept"]
        dropped = [i for i in range(source.layers) if i not in kept]
        lines.append(f"{m.get('layers') or '-':<16} {m.get('hidden') or '-':<8} {r['kl']:>8.4f} {r['loss']:>8.3f} "
                     f"{r['loss_delta']:>+8.3f} {r['top1_agreement']:>6.1%}  {dropped or '-'}")
    best = rows[0][0]
    flags = " ".join(f"--{flag}-method {best[a]}" for a, flag in (("layers", "layer"), ("hidden", "hidden"))
                     if best.get(a))
    lines += ["", f"closest to the source: {flags} (KL: nats/token to the source, its top-64 tokens + the rest)"]
    return "\n".join(lines)


HELP = {
    FileNotFoundError: "check the path; SRC_DIR must hold config.json and safetensors weights",
    FileExistsError: "choose a new OUT_DIR or remove the existing one",
}


def main(argv: list[str]) -> int:
    """Run the command; 0 on success, 1 on bad input (one ``error:`` and one ``help:`` line), 2 on usage."""
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    if (args.from_plan is None) != (args.stage is None):
        p.print_usage(sys.stderr)
        print("cascadec prune: error: --from-plan and --stage go together", file=sys.stderr)
        return 2
    if (args.out is None) != args.compare:
        p.print_usage(sys.stderr)
        print("cascadec prune: error: give OUT_DIR, or --compare (which writes nothing)", file=sys.stderr)
        return 2
    if args.from_plan and any(getattr(args, a) is not None for a in AXES):
        p.print_usage(sys.stderr)
        print("cascadec prune: error: --from-plan takes the target from the plan; drop the size flags",
              file=sys.stderr)
        return 2
    try:
        run(args)
    except SurgeryError as e:
        return fail(str(e), e.help)
    except (FileNotFoundError, FileExistsError) as e:
        return fail(str(e), HELP[type(e)])
    except hub.HubError as e:
        return fail(str(e), "SRC is a model directory or a hub id ORG/NAME[@REVISION]")
    return 0


def fail(message: str, help_line: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    print(f"help: {help_line}", file=sys.stderr)
    return 1
