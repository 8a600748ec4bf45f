"""Diagnostics as data: one frozen record per problem, rendered with a code frame.

Every pass returns *all* its diagnostics; `CompileError` carries them across a pass boundary.
Codes are stable (tests pin the rendered text), grouped by pass:
CSC0xx source, CSC1xx schema, CSC2xx lowering and semantic checks.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Span:
    line: int  # 1-based
    col: int  # 1-based
    end_col: int | None = None  # exclusive; None = one caret


@dataclass(frozen=True, kw_only=True)
class Diagnostic:
    code: str
    message: str
    path: str  # the spec file as the user named it
    span: Span | None = None
    help: str | None = None
    severity: str = "error"  # "error" | "warning"
    notes: tuple[str, ...] = ()


class CompileError(Exception):
    """Raised at a pass boundary when that pass found at least one error."""

    def __init__(self, diagnostics: list[Diagnostic]):
        super().__init__(f"{len(diagnostics)} diagnostic(s)")
        self.diagnostics = diagnostics


def errors(diags: list[Diagnostic]) -> list[Diagnostic]:
    return [d for d in diags if d.severity == "error"]


def closest(name: str, choices) -> str | None:
    """The choice ``name`` most likely misspells, or None when nothing is close."""
    close = difflib.get_close_matches(str(name), sorted(map(str, choices)), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, choices) -> str | None:
    """A `did you mean 'x'?` suffix, or None when nothing is close."""
    close = closest(name, choices)
    return f"did you mean '{close}'?" if close else None


def render(d: Diagnostic, text: str | None = None) -> str:
    """`file:line:col: error[CODE]: message`, a code frame, then help and notes."""
    where = d.path if d.span is None else f"{d.path}:{d.span.line}:{d.span.col}"
    out = [f"{where}: {d.severity}[{d.code}]: {d.message}"]
    if d.span is not None and text is not None:
        lines = text.splitlines()
        if 0 < d.span.line <= len(lines):
            src = lines[d.span.line - 1].replace("\x00", "\u2400")  # show NUL as ␀, one column wide
            gutter = str(d.span.line)
            pad = " " * len(gutter)
            width = 1
            if d.span.end_col and d.span.end_col > d.span.col:
                width = d.span.end_col - d.span.col
            out.append(f"{pad} |")
            out.append(f"{gutter} | {src}")
            out.append(f"{pad} | {' ' * (d.span.col - 1)}{'^' * width}")
    for note in d.notes:
        out.append(f"  = note: {note}")
    if d.help:
        out.append(f"  = help: {d.help}")
    return "\n".join(out)


def render_all(diags: list[Diagnostic], texts: dict[str, str]) -> str:
    """All diagnostics, sorted by file and position, then a one-line summary."""

    def key(d: Diagnostic):
        return (d.path, d.span.line if d.span else 0, d.span.col if d.span else 0, d.code)

    body = [render(d, texts.get(d.path)) for d in sorted(diags, key=key)]
    n_err = len(errors(diags))
    n_warn = len(diags) - n_err
    summary = []
    if n_err:
        summary.append(f"{n_err} error{'s' if n_err != 1 else ''}")
    if n_warn:
        summary.append(f"{n_warn} warning{'s' if n_warn != 1 else ''}")
    return "\n\n".join(body) + ("\n\n" + ", ".join(summary) if summary else "")
