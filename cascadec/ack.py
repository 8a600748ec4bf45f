"""Acknowledged warnings: `# cascadec: ack CSC220` comments in a spec silence warnings the
author has read and accepts, so that a warning that is expected does not repeat on every command.

Pure: works on the diagnostics and the spec's text; never touches errors (an error cannot be
acknowledged away). Where the comment sits decides what it covers (as ruff's `noqa`):

    shape: {layers: 26, hidden: 3072}   # cascadec: ack CSC220 -- one 60% step, as published
        covers warnings of that code whose code frame shows this line;
    # cascadec: ack CSC220 -- ...       (a comment line above a line)
        covers that next line the same way;
    # cascadec: ack CSC214              (a comment line before the spec's first key)
        covers the code everywhere in the file.

An acknowledgement that covers no warning is itself a warning (CSC008): it went stale when the
spec changed, and should go before it hides a new warning of the same kind.
"""

from __future__ import annotations

import re
from .diagnostics import Diagnostic, Span

# `#` opens a YAML comment at the start of a line or after whitespace; text after the codes
# (e.g. `-- why`) is the reason, for the reader.
ACK = re.compile(r"(?:^|\s)#\s*cascadec:\s*ack\s+(CSC\d{3}(?:\s*,\s*CSC\d{3})*)")
FILE = 0  # the "line" of a file-wide acknowledgement


def comments(text: str) -> dict[tuple[int, str], int]:
    """(covered line or FILE, code) -> the line the comment is on (1-based)."""
    out: dict[tuple[int, str], int] = {}
    lines = text.splitlines()
    header = True  # still before the first YAML content line
    for n, line in enumerate(lines, 1):
        bare = line.strip()
        if bare and not bare.startswith("#"):
            header = False
        m = ACK.search(line)
        if not m:
            continue
        codes = [c.strip() for c in m.group(1).split(",")]
        if not bare.startswith("#"):
            covered = n
        elif header:
            covered = FILE
        else:  # the next line that is not blank or a comment
            covered = next((k for k in range(n + 1, len(lines) + 1)
                            if lines[k - 1].strip() and not lines[k - 1].strip().startswith("#")), n)
        for code in codes:
            out.setdefault((covered, code), n)
    return out


def apply(diags: list[Diagnostic], text: str, path: str) -> tuple[list[Diagnostic], list[Diagnostic]]:
    """(diagnostics to show, warnings acknowledged). The shown ones include a CSC008 warning
    for every acknowledgement that covers no warning."""
    acks = comments(text)
    shown, acked, used = [], [], set()
    for d in diags:
        line = d.span.line if d.span else None
        key = next((k for k in ((line, d.code), (FILE, d.code)) if k in acks), None)
        if d.severity == "warning" and key is not None:
            acked.append(d)
            used.add(key)
        else:
            shown.append(d)
    for (covered, code), at in sorted(acks.items(), key=lambda kv: (kv[1], kv[0][1])):
        if (covered, code) in used:
            continue
        col = text.splitlines()[at - 1].find(code) + 1
        scope = "anywhere in this file" if covered == FILE else f"on line {covered}"
        shown.append(Diagnostic(
            code="CSC008", message=f"`ack {code}` acknowledges no warning: there is no {code} warning {scope}",
            path=path, span=Span(line=at, col=col, end_col=col + len(code)), severity="warning",
            help="remove the acknowledgement (the spec changed), or move it onto the line the warning points at"))
    return shown, acked


def count(acked: list[Diagnostic]) -> str:
    """`, 1 warning acknowledged` for a status line ("" when none)."""
    n = len(acked)
    return f", {n} warning{'s' if n != 1 else ''} acknowledged" if n else ""

