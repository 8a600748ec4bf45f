"""`cascadec init`: the named example specs a new family can start from, and the starter text.

Owns the list of examples (the specs in `specs/`, installed as `cascadec.specs`) and the two
edits a copy needs: the family name, and the editor's schema modeline pointed at the installed
schema. Pure except `path`/`text`, which read the installed files; `cli` writes the copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# name -> (file under specs/, what it shows); `cascadec init --help` lists them in this order
EXAMPLES = {
    "tiny": ("tiny.yaml", "the embedded default: a CPU-sized cascade that runs in minutes (default)"),
    "ministral3": ("ministral3.yaml", "Ministral 3: Mistral Small 3.1 -> 14B -> 8B -> 3B, instruct and reasoning variants"),
    "minitron": ("minitron.yaml", "Minitron: Nemotron-4 15B -> 8B -> 4B, width pruning, 94B tokens per child"),
    "qwen3": ("cookbook/qwen3.yaml", "Qwen3-8B -> 4B -> 1.7B shapes with an instruct variant (SFT, DPO)"),
    "llama3.1": ("cookbook/llama3.1.yaml", "Llama-3.1-8B -> a width-pruned and a depth-pruned 4B"),
    "params-target": ("cookbook/params-target.yaml", "Mistral-7B -> ~5B -> ~3B, children given only by a parameter target"),
}
DEFAULT = "tiny"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # the schema's `name`
MODELINE = re.compile(r"^# yaml-language-server: \$schema=.*$", re.M)
FAMILY = re.compile(r"^family: .*$", re.M)


def root() -> Path:
    """The installed examples; in a source checkout installed before `cascadec.specs`
    existed (an old editable install), the `specs/` folder beside the package."""
    from importlib import resources  # here: `cascadec --help` builds the parser on every command

    try:
        return Path(str(resources.files("cascadec.specs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "specs"


def path(name: str) -> Path:
    return root() / EXAMPLES[name][0]


def schema_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("cascadec.schemas").joinpath("family.schema.json")))


def starter(text: str, family: str, out_dir: str) -> str:
    """The example ``text`` as a new spec: `family:` set to ``family`` and the schema modeline
    made relative to ``out_dir`` (where the copy is written), so the editor still validates it."""
    schema = os.path.relpath(schema_path(), os.path.abspath(out_dir or "."))
    text = MODELINE.sub(lambda _: f"# yaml-language-server: $schema={Path(schema).as_posix()}", text, count=1)
    return FAMILY.sub(lambda _: f"family: {family}", text, count=1)
