"""The typed family spec: frozen dataclasses produced by `lower` and read by later passes.

Representations only; no logic beyond trivial accessors. `at` fields are document paths,
kept so that any later pass can point a diagnostic at the line the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from .shapes import Shape


# The pruning method of an axis that shrinks when the spec names none; the plan records each as
# "default". One place, so that a measured better criterion changes every default at once.
# `heads: query` keeps the KV heads and drops query heads within groups; a child whose kv_heads
# shrink gets `kv_groups` instead (resolve.methods). Layers: block influence, measured (a real
# 135M Llama cut 30 -> 24 layers: perplexity 19.1 with it, 29.6 with Ministral 3's norm ratio;
# docs/pruning.md); specs that follow the paper name `norm_ratio` explicitly.
DEFAULT_METHODS = {"layers": "block_influence", "hidden": "pca", "ffn": "activation", "heads": "query"}


@dataclass(frozen=True)
class Share:
    """A token budget written as a share of the family budget (`30%`)."""

    fraction: Fraction


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Resolved, flattened settings (`optimizer.lr` -> 1e-4) and where each value came from."""

    values: dict
    provenance: dict  # same keys -> "spec:<path>" | "default" | "inherited:<path>" | "assumed:<path>: <why>"
    at: dict = field(default_factory=dict)  # keys set in the spec -> the document path that set them

    def __getitem__(self, key: str):
        return self.values[key]

    def group(self, prefix: str) -> dict:
        """`group("optimizer")` -> {"lr": ..., "betas": ...}."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.values.items() if k.startswith(prefix + ".")}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    source: dict  # {"hub": id, "revision"?} | {"path": relpath} | {"bootstrap": {...}}
    arch: Shape | None  # inline (or a preset), else read from a local config.json
    context: int | None  # max_position_embeddings (arch, preset or config.json); None = unknown, not checked
    description: str | None
    bootstrap: "Training | None"
    at: tuple
    config_arch: Shape | None = None  # read from the local config.json, when there is one
    arch_provenance: dict = field(default_factory=dict)  # "shape"[.axis] -> where it came from


# The problems `builtin: tasks` generates (runtime/data/tasks.py), in their interleaving order.
BUILTIN_TASKS = ("expr", "sort", "reverse", "function")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    name: str
    kind: str
    paths: tuple[str, ...]
    field: str | None
    builtin: str | None
    split: str | None
    mix: dict
    hub: str | None = None  # a hub dataset id (kind dataset)
    revision: str | None = None  # its branch, tag or commit
    subset: str | None = None  # its README `configs:` name
    format: str | None = None  # what a record is: text (None), chat, preference, prompts
    system: str | None = None  # system prompt for chat records without one
    on_error: str | None = None  # bad records: fail (None) or skip (counted)
    tasks: tuple[str, ...] | None = None  # builtin tasks: which (all four when the spec names none)
    think: bool | None = None  # builtin tasks: worked steps inside <think>…</think>
    unfinished: float | None = None  # builtin tasks: share of chat records that stop before the answer
    stream: bool
    shuffle: bool
    tokens: int | None
    at: tuple


@dataclass(frozen=True, kw_only=True)
class JudgeSpec:
    name: str
    kind: str
    model: str | None
    options: dict
    at: tuple


@dataclass(frozen=True, kw_only=True)
class Training:
    """One training stage as written: a pretraining phase, a post-training step, a bootstrap."""

    name: str
    kind: str  # distill | sft | dpo | odpo | grpo | bootstrap
    start: str | None  # `from`, as written
    teacher: str | None
    data: str
    tokens: int | Share | None
    prompts: int | None
    seq_len: int
    options: dict  # kind-specific: rope, assistant_only, judge, rewards, beta, clip, ...
    settings: Settings
    at: tuple


@dataclass(frozen=True, kw_only=True)
class ShapeRequest:
    explicit: dict  # axis -> value given in the spec
    params: int | None
    solve_axes: tuple[str, ...]
    tolerance: float
    multiple_of: dict
    order: str  # how the solver chooses among shapes within tolerance (shapes.SOLVE_RULES)
    at: tuple


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    name: str
    prune_from: str
    shape: ShapeRequest
    methods: dict  # axis -> method name
    calibration: Settings
    phases: tuple[Training, ...]
    variants: tuple[tuple[str, tuple[Training, ...]], ...]
    control: tuple[str, ...]  # control bases in spec order: "equal-tokens", "compute-matched"; () for none
    export: bool
    at: tuple


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    data: str
    tokens: int
    seq_len: int  # the first (headline) context length
    at: tuple
    contexts: tuple[int, ...] = ()  # every context length, the first being `seq_len`
    harness: dict | None = None  # lower.harness(): tasks normalised, include, batch_size


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    path: str
    spec_sha256: str
    family: str
    description: str | None
    budget_tokens: int | None
    from_scratch_tokens: int | None
    hardware: Settings
    models: dict[str, ModelSpec]
    data: dict[str, DataSpec]
    judges: dict[str, JudgeSpec]
    children: tuple[ChildSpec, ...]
    eval: EvalSpec | None
    assumed: tuple = field(default=())  # (doc path, why) of every assumed value
    defaults: Settings | None = None  # the family-level settings (built-ins + `defaults:`)
