"""The compiler pipeline: spec file -> plan, one numbered line per pass.

Raises CompileError with every diagnostic of the first pass that failed; warnings ride along
on the result. Nothing here touches the filesystem except `source`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ack, checks, fit, graph, lower, plan, resolve, schema, source
from .diagnostics import CompileError, Diagnostic, errors
from .shapes import from_hf_config


@dataclass(frozen=True)
class Result:
    plan: dict
    graph: object  # networkx.DiGraph
    spec: object  # FamilySpec
    doc: source.Document
    warnings: list[Diagnostic]
    acknowledged: list[Diagnostic] = ()  # warnings a `# cascadec: ack CODE` comment silences


def compile_doc(doc: source.Document, configs: dict) -> Result:
    diags = schema.validate(doc)  # 2. schema
    if diags:
        raise CompileError(diags)
    bad = []
    for name, cfg in configs.items():
        try:
            from_hf_config(cfg)
        except (ValueError, KeyError, TypeError) as e:
            bad.append(Diagnostic(code="CSC216", message=f"model '{name}': {e}", path=doc.path,
                                  span=doc.span(("models", name, "source", "path")),
                                  help="cascadec reads llama, mistral, ministral3, qwen2, qwen3 and mistral3 checkpoints"))
    if bad:
        raise CompileError(bad)
    spec = lower.lower(doc, configs)  # 3. lower
    diags = checks.run(spec, doc)  # 4. checks
    if errors(diags):  # acknowledgements of fit warnings (6b, not reached) are not stale
        raise CompileError([d for d in ack.apply(diags, doc.text, doc.path)[0]
                            if not (d.code == "CSC008" and any(f"`ack {c}`" in d.message for c in fit.CODES))])
    g = graph.build(spec)  # 5. graph
    cycle = graph.check_acyclic(g)
    if cycle:
        at = resolve.cycle_at(spec, cycle)
        raise CompileError([Diagnostic(code="CSC206", message="stage cycle: " + " -> ".join([*cycle, cycle[0]]),
                                       path=doc.path, span=doc.span(at) if at else None,
                                       help="a checkpoint cannot teach or seed its own ancestors")])
    planned = plan.emit(g, spec)  # 6. plan
    fits = fit.check(planned, g, doc)  # 6b. does every stage fit its devices?
    diags, acked = ack.apply(diags + fits, doc.text, doc.path)  # acknowledged warnings drop out
    if errors(diags):
        raise CompileError(diags)
    return Result(plan=planned, graph=g, spec=spec, doc=doc, warnings=diags, acknowledged=acked)


def compile_file(path: str) -> Result:
    doc = source.load(path)  # 1. source
    return compile_doc(doc, source.model_configs(doc))
