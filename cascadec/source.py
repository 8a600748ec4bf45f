"""Pass 1 — source: bytes -> Document (plain data plus the line:col of every node).

Loads YAML safely: no tags beyond YAML's core types, no duplicate keys, bounded alias
expansion. Only this module and `cli` read files. Never raises anything but CompileError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from .diagnostics import CompileError, Diagnostic, Span

_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
MAX_NODES = 100_000  # alias expansion bound: a YAML "billion laughs" stops here
MAX_DEPTH = 100  # nesting bound; a real spec nests fewer than ten levels
MAX_BYTES = 4 * 1024 * 1024
# libyaml's composer when PyYAML has it (15x faster; it also caps nesting at 1,000 levels itself)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
CORE_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


@dataclass(frozen=True)
class Document:
    path: str  # as the user named it (used in diagnostics)
    text: str
    data: object
    # JSON-pointer-like tuple path -> span of the value node; ("key", *path) -> span of the key
    spans: dict = field(default_factory=dict)

    def span(self, path: tuple, *, key: bool = False) -> Span | None:
        """The span of the node at ``path`` (or of its key), else of its nearest ancestor."""
        if key and ("key", *path) in self.spans:
            return self.spans[("key", *path)]
        path = tuple(path)
        while path not in self.spans and path:
            path = path[:-1]
        return self.spans.get(path)


def where(path: tuple) -> str:
    """A document path as users read it: `children[0].phases[1].tokens` ("" for the root)."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _span(node) -> Span:
    start, end = node.start_mark, node.end_mark
    end_col = end.column + 1 if end.line == start.line else None
    return Span(line=start.line + 1, col=start.column + 1, end_col=end_col)


def _fail(path: str, code: str, message: str, span: Span | None = None, help: str | None = None, notes=()):
    raise CompileError([Diagnostic(code=code, message=message, path=path, span=span, help=help, notes=tuple(notes))])


def parse(text: str, path: str) -> Document:
    """Parse YAML text into a Document; all failures are located CompileErrors."""
    if not text.strip():
        _fail(path, "CSC002", "the spec is empty",
              help="start from specs/tiny.yaml, or run `cascadec validate` on an existing spec")
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        span = Span(line=mark.line + 1, col=mark.column + 1) if mark else None
        problem = e.problem or e.context or "invalid YAML"
        notes = []
        if e.problem and e.context and e.context_mark and \
                (e.context_mark.line, e.context_mark.column) != (mark.line, mark.column):
            notes.append(f"{e.context} that starts at {e.context_mark.line + 1}:{e.context_mark.column + 1}")
        _fail(path, "CSC003", f"invalid YAML: {problem}", span,
              help="check indentation and quoting near this position", notes=notes)
    except yaml.YAMLError as e:
        _fail(path, "CSC003", f"invalid YAML: {e}")
    except RecursionError:
        _fail(path, "CSC006", f"the document nests deeper than {MAX_DEPTH} levels",
              help="a spec is a few levels of mappings and lists; check for runaway brackets")
    finally:
        loader.dispose()
    spans: dict = {}
    constructor = yaml.constructor.SafeConstructor()  # one per document: it memoises what it built
    budget = [MAX_NODES]
    ancestors: set = set()  # ids of the collection nodes on the current path

    def build(node, at: tuple):
        budget[0] -= 1
        if budget[0] < 0:
            _fail(path, "CSC006", f"YAML aliases expand the document past {MAX_NODES:,} nodes (in '{at[0]}')",
                  spans.get(("key", at[0])) or spans.get(at[:1]),
                  help="remove repeated YAML aliases (*name); write the values out")
        if id(node) in ancestors:
            _fail(path, "CSC006", "a YAML alias refers to a node that contains it",
                  spans.get(("key", *at)) or spans.get(at[:-1]),
                  help="remove the recursive alias (*name)")
        if len(at) > MAX_DEPTH:
            _fail(path, "CSC006", f"the document nests deeper than {MAX_DEPTH} levels", _span(node),
                  help="a spec is a few levels of mappings and lists; check for runaway brackets")
        spans[at] = _span(node)
        if node.tag not in CORE_TAGS:
            _fail(path, "CSC005", f"YAML tag {node.tag!r} is not allowed", _span(node),
                  help="specs use plain YAML values; quote the value if it is a string")
        if isinstance(node, yaml.MappingNode):
            ancestors.add(id(node))
            out = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    _fail(path, "CSC007", "mapping keys must be plain strings", _span(knode))
                key = knode.value
                if key == "<<":
                    _fail(path, "CSC005", "YAML merge keys (<<) are not allowed", _span(knode),
                          help="write the keys out, or use `defaults:` for shared values")
                if key in out:
                    _fail(path, "CSC004", f"duplicate key '{key}'", _span(knode),
                          help=f"'{key}' is already set above in this mapping; keep one")
                spans[("key", *at, key)] = _span(knode)
                out[key] = build(vnode, (*at, key))
            ancestors.discard(id(node))
            return out
        if isinstance(node, yaml.SequenceNode):
            ancestors.add(id(node))
            out = [build(v, (*at, i)) for i, v in enumerate(node.value)]
            ancestors.discard(id(node))
            return out
        if node.tag == "tag:yaml.org,2002:str":
            # YAML 1.1 reads an unquoted `1e-4` as a string; in a spec it is a number.
            if not node.style and _SCIENTIFIC.match(node.value):  # plain: None (Python) or "" (libyaml)
                return float(node.value)
            return node.value
        # int, float, bool and null, resolved the way SafeLoader would
        return constructor.yaml_constructors[node.tag](constructor, node)

    if root is None:
        _fail(path, "CSC002", "the spec is empty",
              help="start from specs/tiny.yaml, or run `cascadec validate` on an existing spec")
    data = build(root, ())
    return Document(path=path, text=text, data=data, spans=spans)


def load(path: str) -> Document:
    """Read and parse a spec file. Unreadable, oversized or non-UTF-8 files are diagnostics."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        _fail(path, "CSC001", "no such file", help="check the path; specs usually live in specs/")
    except IsADirectoryError:
        _fail(path, "CSC001", "is a directory, not a spec file")
    except OSError as e:
        _fail(path, "CSC001", f"cannot read the file: {e.strerror}")
    if len(raw) > MAX_BYTES:
        _fail(path, "CSC001", f"the file is larger than {MAX_BYTES // (1024 * 1024)} MiB; a spec is a small YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        _fail(path, "CSC001", f"not UTF-8 text (byte 0x{raw[e.start]:02x})", Span(line=line, col=col),
              help="save the spec as UTF-8 YAML")
    if "\x00" in text:
        at = text.index("\x00")
        line = text.count("\n", 0, at) + 1
        _fail(path, "CSC001", "the file contains NUL bytes; is it binary?",
              Span(line=line, col=at - (text.rfind("\n", 0, at) + 1) + 1), help="save the spec as UTF-8 YAML text")
    return parse(text, path)


def model_configs(doc: Document) -> dict[str, dict]:
    """`config.json` of every model whose source is a local path (relative to the spec file).

    Missing or unreadable configs are simply absent: `checks` reports a model with neither a
    readable config nor an inline `arch`, and cross-checks an inline `arch` against a config.
    """
    import json
    import os

    base = os.path.dirname(doc.path)
    out = {}
    models = doc.data.get("models") if isinstance(doc.data, dict) else None
    for name, m in (models if isinstance(models, dict) else {}).items():
        src = m.get("source") if isinstance(m, dict) else None
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            try:
                with open(os.path.join(base, src["path"], "config.json"), encoding="utf-8") as f:
                    out[name] = json.load(f)
            except (OSError, ValueError):
                continue
    return out
