"""Decoder shapes and their exact parameter counts; the one place that knows the arithmetic.

Pure Python (no torch): the compiler, the runtime and the tests all count parameters here,
so a pruned checkpoint's ``numel`` sum and the plan's figure can never drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Decoder families the runtime can load and cut. `mistral3` is the text tower of the Mistral 3
# vision-language model (its vision tower is carried along and not counted here).
FAMILIES = ("llama", "mistral", "ministral3", "qwen2", "qwen3", "mistral3", "nemotron")
# Families the compiler can plan but the runtime cannot cut yet: Nemotron-4 (squared-ReLU MLP
# with two matrices, LayerNorm with bias) is here so Minitron's published family plans exactly.
PLAN_ONLY_FAMILIES = ("nemotron",)

# HF `model_type` -> cascadec family. `ministral` (Ministral 8B 2410) has Mistral's layout.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "ministral": "mistral",
    "ministral3": "ministral3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral3": "mistral3",
    "nemotron": "nemotron",
}


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The axes of a SwiGLU, RMSNorm, GQA decoder that pruning can change."""

    family: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    def replace(self, **changes) -> "Shape":
        return dataclasses.replace(self, **changes)

    def axes(self) -> dict:
        return dataclasses.asdict(self)


def layer_params(s: Shape) -> int:
    """Parameters in one decoder layer."""
    q = s.heads * s.head_dim
    kv = s.kv_heads * s.head_dim
    attention = s.hidden * q + 2 * s.hidden * kv + q * s.hidden
    if s.family == "qwen2":  # q/k/v projections carry a bias
        attention += q + 2 * kv
    if s.family == "qwen3":  # per-head RMSNorm on queries and keys
        attention += 2 * s.head_dim
    if s.family == "nemotron":  # up/down only; two LayerNorms with weight and bias
        return attention + 2 * s.hidden * s.ffn + 4 * s.hidden
    mlp = 3 * s.hidden * s.ffn
    norms = 2 * s.hidden
    return attention + mlp + norms


def embedding_params(s: Shape) -> int:
    """Input embedding plus LM head (one matrix when tied)."""
    return s.vocab * s.hidden * (1 if s.tied_embeddings else 2)


def param_count(s: Shape) -> int:
    """Exact parameter count of the text decoder: layers, embeddings, final norm.

    Reproduces the published counts: Mistral Small 3.1 text model 23,572,403,200 and
    Ministral 3 14B 13,506,073,600.
    """
    final_norm = 2 * s.hidden if s.family == "nemotron" else s.hidden
    return s.layers * layer_params(s) + embedding_params(s) + final_norm


def from_hf_config(config: dict) -> Shape:
    """Read a Shape from a Hugging Face ``config.json`` mapping (text tower for Mistral 3).

    Raises ValueError with a readable message for an unsupported ``model_type``.
    """
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        supported = ", ".join(sorted(HF_MODEL_TYPES))
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}")
    family = HF_MODEL_TYPES[model_type]
    text = config.get("text_config", config) if family == "mistral3" else config
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    head_dim = text.get("head_dim") or hidden // heads
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Shape(
        family=family,
        layers=int(text["num_hidden_layers"]),
        hidden=hidden,
        ffn=int(text["intermediate_size"]),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab=int(text["vocab_size"]),
        tied_embeddings=bool(tied),
    )


def config_errors(s: Shape) -> list[tuple[str, str]]:
    """(what is wrong, how to fix it) for each rule that ``s``'s family's Hugging Face config
    enforces when a checkpoint is loaded (checked against transformers 5.24).

    A shape that breaks one can be written but never loaded, so the compiler refuses it at plan
    time and ``cascadec prune`` before writing anything. Only ``llama`` configs validate
    ``hidden % heads`` (Mistral, Qwen and Ministral 3 carry an explicit head_dim instead).
    """
    errors = []
    if s.family == "llama" and s.hidden % s.heads:
        below = s.hidden - s.hidden % s.heads
        errors.append((f"hidden {s.hidden} is not a multiple of heads {s.heads}, which transformers "
                       f"requires of llama configs (the checkpoint could not be loaded)",
                       f"choose hidden as a multiple of {s.heads} (e.g. {below} or {below + s.heads}), "
                       f"or change heads"))
    return errors


def hf_config_updates(s: Shape) -> dict:
    """The ``config.json`` keys (of the text config for Mistral 3) that carry a Shape."""
    return {
        "num_hidden_layers": s.layers,
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "tie_word_embeddings": s.tied_embeddings,
    }


# How the solver chooses among the shapes within tolerance of a `params` target (`solve.order`).
SOLVE_RULES = {
    "uniform": "the most uniform cut (smallest largest per-axis shrink: Minitron and ModelOpt cap depth "
               "and width pruning), then the smallest error, then the larger shape",
    "width_first": "width before depth (Minitron): the most layers kept, then the most uniform width cut, "
                   "then the smallest error",
}


@dataclass(frozen=True, kw_only=True)
class Solution:
    """A solved `params` target: the chosen shape and the shapes it was chosen from."""

    shape: Shape
    order: str
    candidates: tuple[Shape, ...]  # every valid shape within tolerance, best first (the chosen one first)


def _grid(source: Shape, fixed: dict, axes: tuple[str, ...], multiple_of: dict):
    """(shape with layers and hidden set, FFN widths allowed) for every (layers, hidden) the axes
    allow; FFN widths ascending. Parameters are linear in the FFN width for a fixed rest."""
    base = source.replace(**fixed)

    def options(axis: str) -> list[int]:
        top = getattr(base, axis)
        if axis not in axes:
            return [top]
        if axis == "layers":
            return list(range(1, top + 1))
        step = multiple_of.get(axis, 1)
        vals = list(range(step, top + 1, step))
        return vals if top in vals else vals + [top]

    ffns = options("ffn")
    for layers in options("layers"):
        for hidden in options("hidden"):
            yield base.replace(layers=layers, hidden=hidden), ffns


def _near(trial: Shape, ffns: list[int], target: int) -> list[int]:
    """The allowed FFN widths whose parameter counts bracket ``target`` (closed form)."""
    if len(ffns) == 1:
        return ffns
    slope = trial.layers * (2 if trial.family == "nemotron" else 3) * trial.hidden  # parameters per FFN channel
    exact = (target - param_count(trial.replace(ffn=0))) / slope if slope else 0
    unit = ffns[1] - ffns[0]
    lo = int(exact // unit) * unit
    return sorted({min(max(ffns[0], c), ffns[-1]) for c in (lo, lo + unit)})


def solve(source: Shape, target: int, **how) -> Shape | None:
    """The shape `solution` chooses, or None."""
    found = solution(source, target, **how)
    return None if found is None else found.shape


def solution(
    source: Shape,
    target: int,
    *,
    fixed: dict,
    axes: tuple[str, ...],
    tolerance: float,
    multiple_of: dict,
    order: str = "uniform",
) -> Solution | None:
    """The shape nearest ``target`` parameters reachable by shrinking ``axes`` of ``source``.

    Deterministic. For every (layers, hidden) candidate the FFN width is solved in closed form
    (parameters are linear in it) and rounded to its multiple. Shapes whose Hugging Face config
    would not load (`config_errors`) are never candidates. Among shapes within ``tolerance`` the
    rule of ``order`` (SOLVE_RULES) chooses. Returns None when no shape is within tolerance.
    """
    found = []
    for trial, ffns in _grid(source, fixed, axes, multiple_of):
        for ffn in _near(trial, ffns, target):
            shape = trial.replace(ffn=ffn)
            err = abs(param_count(shape) - target) / target
            if err > tolerance or config_errors(shape):
                continue
            shrink = {a: 1 - getattr(shape, a) / getattr(source, a) for a in ("layers", "hidden", "ffn")}
            tail = (round(err, 12), -shape.layers, -shape.hidden, -shape.ffn)
            if order == "width_first":
                key = (-shape.layers, round(max(shrink["hidden"], shrink["ffn"]), 9), *tail)
            else:
                key = (round(max(shrink.values()), 9), *tail)
            found.append((key, shape))
    if not found:
        return None
    ranked = tuple(shape for _, shape in sorted(found, key=lambda ks: ks[0]))
    return Solution(shape=ranked[0], order=order, candidates=ranked)


def reachable(source: Shape, target: int, *, fixed: dict, axes: tuple[str, ...],
              multiple_of: dict) -> tuple[int, int, int | None, int | None]:
    """(smallest, largest, nearest below ``target``, nearest above) parameter counts of the
    loadable shapes the axes allow: the true range a `params` target can be chosen from."""
    lo = hi = below = above = None
    for trial, ffns in _grid(source, fixed, axes, multiple_of):
        for ffn in {ffns[0], ffns[-1], *_near(trial, ffns, target)}:
            shape = trial.replace(ffn=ffn)
            if config_errors(shape):
                continue
            n = param_count(shape)
            lo, hi = min(lo or n, n), max(hi or n, n)
            if n <= target and (below is None or n > below):
                below = n
            if n >= target and (above is None or n < above):
                above = n
    return lo, hi, below, above
