"""The `cascadec` command line. Owns argument parsing, file output and exit codes; no logic.

Exit codes: 0 success, 1 spec/plan errors (or `diff`: plans differ), 2 usage errors
(or `diff`: could not compare; `run --dry-run`: work pending). Never imports torch: the
runtime is imported lazily inside `run`, `prune` and `report` only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from . import __version__

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2
# A compile allocates many small, long-lived objects; Python's default GC thresholds rescan
# them over and over, which makes large specs super-linear. mypy raises them the same way.
GC_THRESHOLDS = (100_000, 50, 100)


def _err(message: str, help: str | None = None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if help:
        print(f"  = help: {help}", file=sys.stderr)


def _print_diagnostics(diags, doc_texts: dict) -> None:
    from .diagnostics import render_all

    if diags:
        print(render_all(diags, doc_texts), file=sys.stderr)


def _texts(paths) -> dict:
    out = {}
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                out[p] = f.read()
        except (OSError, UnicodeDecodeError):
            pass
    return out


def _compile(spec_path: str):
    """Compile, printing diagnostics; returns the Result or None."""
    from .compile import compile_file
    from .diagnostics import CompileError

    try:
        result = compile_file(spec_path)
    except CompileError as e:
        _print_diagnostics(e.diagnostics, _texts([spec_path]))
        return None
    _print_diagnostics(result.warnings, {spec_path: result.doc.text})
    return result


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cascadec-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_plan(path: str) -> bool:
    return path.endswith(".json")


def load_plan_or_spec(path: str, *, replan: bool = False):
    """(plan dict, spec path or None) for a spec or a saved plan; None after printing errors."""
    from . import plancheck

    if not _is_plan(path):
        result = _compile(path)
        if result is None:
            return None
        return dict(result.plan, spec_file=os.path.relpath(path)), path
    plan = plancheck.load(path)
    if isinstance(plan, str):
        _err(plan, "regenerate it with `cascadec plan SPEC -o PLAN`")
        return None
    spec = os.path.normpath(os.path.join(os.path.dirname(path), plan.get("spec_file", "")))
    if not plan.get("spec_file") or not os.path.isfile(spec):
        _err(f"the spec this plan came from ({spec}) is missing", "keep the plan beside its spec, or re-plan")
        return None
    from .workspace import check_saved_plan

    with open(spec, "rb") as f:
        spec_bytes = f.read()
    stale = check_saved_plan(plan, spec_bytes)
    if stale:
        if not replan:
            _err(f"{path}: {stale}", f"review the change with `cascadec plan {spec}` first")
            return None
        # status, report and run --replan go on with a fresh plan, and say so first
        print(f"warning: {path}: {check_saved_plan(plan, spec_bytes, advice=False)} "
              f"Using a fresh plan of {spec}.", file=sys.stderr)
        print(f"  = help: `cascadec plan {spec} -o {path}` updates the saved plan (review its diff with "
              f"`cascadec diff {path} {spec}`)", file=sys.stderr)
        result = _compile(spec)
        if result is None:
            return None
        return dict(result.plan, spec_file=plan["spec_file"]), spec
    return plan, spec


# -- commands -----------------------------------------------------------------------------


def cmd_validate(args) -> int:
    status = EXIT_OK
    for path in args.specs:
        result = _compile(path)
        if result is None:
            status = EXIT_ERRORS
        else:
            from .ack import count

            print(f"ok: {path}: family '{result.plan['family']}', {len(result.plan['stages'])} stages"
                  f"{count(result.acknowledged)}")
    return status


def cmd_plan(args) -> int:
    from . import text

    result = _compile(args.spec)
    if result is None:
        return EXIT_ERRORS
    plan = result.plan
    if args.output:
        plan = dict(plan, spec_file=os.path.relpath(args.spec, os.path.dirname(os.path.abspath(args.output))))
    else:
        plan = dict(plan, spec_file=os.path.relpath(args.spec))
    from .plan import canonical

    if args.emit:
        from . import emit

        plan_ref = args.output or args.spec
        # the scripts cd into DIR, so both paths are written relative to it
        workdir = os.path.relpath(args.workdir or f"runs/{plan['family']}", args.emit)
        emit.write(args.emit, emit.render(plan, os.path.relpath(plan_ref, args.emit), workdir))
    if args.output:
        _write_atomic(args.output, canonical(plan))
    if args.format == "json" and not args.output:
        sys.stdout.write(canonical(plan))
    else:
        sys.stdout.write(text.table(plan, args.spec))
        if args.output:
            print(f"wrote {args.output}")
        if args.emit:
            print(f"wrote launch scripts to {args.emit}/ (run.sh, submit.sh, slurm/)")
    return EXIT_OK


def cmd_graph(args) -> int:
    from . import draw

    result = _compile(args.spec)
    if result is None:
        return EXIT_ERRORS
    sys.stdout.write({"mermaid": draw.mermaid, "dot": draw.dot, "ascii": draw.ascii_tree}[args.format](result.plan))
    return EXIT_OK


def cmd_diff(args) -> int:
    from . import plancheck
    from .diff import diff, spec_changes

    plans, texts = [], []
    for path in (args.old, args.new):
        if _is_plan(path):  # a saved plan is compared as saved, even when its spec has moved on since
            plan = plancheck.load(path)
            if isinstance(plan, str):
                _err(plan, "regenerate it with `cascadec plan SPEC -o PLAN`")
                return EXIT_USAGE
        else:
            result = _compile(path)
            if result is None:
                return EXIT_USAGE
            plan = result.plan
            texts.append(result.doc.text)
        plans.append(plan)
    old, new = ({k: v for k, v in p.items() if k != "spec_file"} for p in plans)
    lines = diff(old, new, spec_lines=spec_changes(args.old, texts[0], args.new, texts[1]) if len(texts) == 2 else ())
    if not lines:
        print("plans are equal")
        return EXIT_OK
    print("\n".join(lines))
    return EXIT_ERRORS


def cmd_init(args) -> int:
    from . import examples

    if not examples.NAME.fullmatch(args.name):
        _err(f"{args.name!r} is not a family name",
             "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit (at most 64)")
        return EXIT_USAGE
    out = args.output or f"{args.name}.yaml"
    source = examples.path(args.example)
    with open(source, encoding="utf-8") as f:
        text = examples.starter(f.read(), args.name, os.path.dirname(out))
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        with open(out, "x", encoding="utf-8") as f:  # "x": never overwrite, not even in a race
            f.write(text)
    except FileExistsError:
        _err(f"{out} already exists; cascadec init never overwrites a file", "pass another path with -o, or remove it first")
        return EXIT_ERRORS
    print(f"wrote {out}: family '{args.name}', from example '{args.example}' ({examples.EXAMPLES[args.example][1]})")
    print(f"next: edit it, then `cascadec validate {out}` and `cascadec plan {out}`")
    return EXIT_OK


def _workdir(args, plan) -> str:
    return args.workdir or os.path.join("runs", plan["family"])


def cmd_status(args) -> int:
    from . import workspace

    loaded = load_plan_or_spec(args.target, replan=True)
    if loaded is None:
        return EXIT_ERRORS
    plan, spec = loaded
    try:
        lines = workspace.status_lines(plan, _workdir(args, plan), os.path.dirname(os.path.abspath(spec)))
    except workspace.WorkspaceError as e:
        _err(str(e))
        return EXIT_ERRORS
    print("\n".join(lines))
    return EXIT_OK


def cmd_run(args) -> int:
    loaded = load_plan_or_spec(args.target, replan=args.replan)
    if loaded is None:
        return EXIT_ERRORS
    plan, spec = loaded
    from .runtime.executor import run_plan

    workdir = _workdir(args, plan)
    status = run_plan(plan, workdir, os.path.dirname(os.path.abspath(spec)),
                      only=args.only or [], force=args.force or [], dry_run=args.dry_run)
    report = [s for s in plan["stages"] if s["kind"] == "report"]
    if status == EXIT_OK and not args.dry_run and not args.only and report:
        path = os.path.join(workdir, report[0]["outputs"][0])
        if os.path.exists(path):
            print(f"report: {path}")
    return status


def cmd_prune(args, rest) -> int:
    from .runtime.surgery.prune_cmd import main as prune_main

    return prune_main(rest)


def cmd_report(args) -> int:
    loaded = load_plan_or_spec(args.target, replan=True)
    if loaded is None:
        return EXIT_ERRORS
    plan, spec = loaded
    from .runtime.report import report_cmd

    return report_cmd(plan, _workdir(args, plan), fmt=args.format)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cascadec",
        description="Compile a model-family spec into a cascade-distillation plan, and run it.",
        epilog="exit codes: 0 success, 1 errors in the spec or plan, 2 usage errors",
    )
    p.add_argument("--version", action="version", version=f"cascadec {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from .examples import DEFAULT, EXAMPLES

    s = sub.add_parser("init", help="start a spec from a named example", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Start a family spec from a named example: a copy with `family:` set to NAME. Never overwrites a file.",
                       epilog="examples:\n" + "\n".join(f"  {n:<14} {what}" for n, (_, what) in EXAMPLES.items()))
    s.add_argument("name", metavar="NAME", help="family name of the new spec")
    s.add_argument("--from", dest="example", choices=list(EXAMPLES), default=DEFAULT, metavar="EXAMPLE",
                   help=f"example to start from (default: {DEFAULT}; listed below)")
    s.add_argument("-o", "--output", metavar="PATH", help="where to write the spec (default: NAME.yaml)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("validate", help="check specs; print every diagnostic", description="Check one or more family specs against the schema and the semantic rules; print every diagnostic.")
    s.add_argument("specs", nargs="+", metavar="SPEC", help="family spec files (YAML)")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("plan", help="compile a spec into a plan", description="Compile a spec into a deterministic, reviewable plan: a table of stages with tokens, steps, FLOPs and device-hours, or canonical JSON.")
    s.add_argument("spec", metavar="SPEC", help="family spec file (YAML)")
    s.add_argument("-o", "--output", metavar="PLAN", help="write the canonical JSON plan here (commit it; review its diffs)")
    s.add_argument("--format", choices=("text", "json"), default="text", help="stdout format (default: text)")
    s.add_argument("--emit", metavar="DIR", help="also render launch scripts (run.sh, submit.sh, slurm/*.sbatch) into DIR")
    s.add_argument("--workdir", metavar="DIR", help="workspace the emitted scripts use (default: runs/FAMILY)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("graph", help="draw the family: models, teachers, data, stages", description="Draw the family: models, data sources, and every stage in one group per child, with \"teaches\" edges from each teacher and \"judges\" edges from each judge model. `ascii` draws the cascade as a tree for a terminal (who is cut from whom, phases, variants, who teaches whom).")
    s.add_argument("spec", metavar="SPEC", help="family spec file (YAML)")
    s.add_argument("--format", choices=("mermaid", "dot", "ascii"), default="mermaid", help="output format (default: mermaid)")
    s.set_defaults(func=cmd_graph)

    s = sub.add_parser("diff", help="explain the change between two plans or specs", description="Explain the change between two plans (or specs): a one-line summary (stages changed, invalidated, added, removed; how many would rerun, at what device-hours), the spec lines that changed (two specs), then each stage's changed fields and cost (tokens, FLOPs, device-hours), and the downstream stages each change invalidates. Exit 0 when equal, 1 when different, 2 when they cannot be compared.")
    s.add_argument("old", metavar="OLD", help="plan (.json) or spec (.yaml)")
    s.add_argument("new", metavar="NEW", help="plan (.json) or spec (.yaml)")
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("run", help="execute a plan, skipping what is up to date", description="Execute a spec or saved plan stage by stage: skip what is up to date, resume what was interrupted. A saved plan whose spec has changed is refused unless --replan.")
    s.add_argument("target", metavar="SPEC|PLAN", help="family spec (plans it first) or saved plan (.json)")
    s.add_argument("--workdir", metavar="DIR", help="workspace (default: runs/FAMILY)")
    s.add_argument("--only", action="append", metavar="GLOB", help="run only stages whose id matches (and their out-of-date ancestors); repeatable")
    s.add_argument("--force", action="append", metavar="GLOB", help="rerun matching stages even when up to date; repeatable")
    s.add_argument("--dry-run", action="store_true", help="print what would run and why; exit 0 if nothing to do, 2 if work is pending")
    s.add_argument("--replan", action="store_true", help="with a saved plan whose spec changed: plan again and run that")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="show every stage's state (no torch)", description="Show every stage's state in the workspace and why, without loading the runtime.")
    s.add_argument("target", metavar="SPEC|PLAN", help="family spec or saved plan (.json)")
    s.add_argument("--workdir", metavar="DIR", help="workspace (default: runs/FAMILY)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("prune", help="prune a Hugging Face checkpoint to a shape", description="Prune a Hugging Face checkpoint directory to a target shape (see `cascadec prune --help`).", add_help=False)
    s.set_defaults(func=None)

    s = sub.add_parser("report", help="write the family report", description="Write the family report (Markdown + plots, or JSON) from a workspace.")
    s.add_argument("target", metavar="SPEC|PLAN", help="family spec or saved plan (.json)")
    s.add_argument("--workdir", metavar="DIR", help="workspace (default: runs/FAMILY)")
    s.add_argument("--format", choices=("md", "json"), default="md", help="output format (default: md)")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    import gc

    gc.set_threshold(*GC_THRESHOLDS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prune"]:
        return cmd_prune(None, argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except OSError as e:
        _err(f"{e.filename or ''}: {e.strerror}" if e.filename else str(e))
        return EXIT_ERRORS


if __name__ == "__main__":
    sys.exit(main())
