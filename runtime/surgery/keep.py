"""What a prune keeps: checks a target shape against its source, then picks layers, FFN
channels, heads and the hidden basis from calibration scores.

Owns the choices (indices and the rotation), never reads or writes a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cascadec.shapes import Shape, config_errors
from cascadec.spec import DEFAULT_METHODS

# Method names per axis as the plan's `prune.config.methods` spells them (aliases accepted).
METHODS = {
    "layers": {"norm_ratio", "block_influence", "angular"},
    "hidden": {"pca", "channel"},
    "ffn": {"activation", "ffn_activation"},
    # The compiler writes `query` (query heads within groups) or `kv_groups` (whole groups); one
    # GQA-aware algorithm serves both, and the target shape says which counts change.
    "heads": {"importance", "heads", "query", "kv_groups"},
}
# Other spellings of the same algorithm (the compiler's names for heads; an old ffn name).
ALIASES = {"ffn_activation", "heads", "query", "kv_groups"}
# What `cascadec prune` uses when a flag does not say: the compiler's defaults, one table.
DEFAULT = DEFAULT_METHODS
# The calibration score each method reads.
NEEDS = {"norm_ratio": "norm_ratio", "block_influence": "block_influence",
         "angular": "angular_distance", "pca": "hidden_covariance", "channel": "hidden_channel",
         "activation": "ffn_activation", "ffn_activation": "ffn_activation",
         "importance": "heads", "heads": "heads", "query": "heads", "kv_groups": "heads"}
# The calibrate-stage score (calibrate.SCORES) that produces it, where the name differs.
SCORE = {"angular": "angular", "pca": "hidden_pca", "channel": "hidden_channel"}


def scores_for(methods: dict) -> list[str]:
    """The calibration scores a prune with ``methods`` needs (sorted; empty: no calibration)."""
    return sorted({SCORE.get(m, NEEDS[m]) for m in methods.values() if m is not None})


class SurgeryError(ValueError):
    """Bad prune input: a one-line message and a ``help`` line for the user."""

    def __init__(self, message: str, help: str):
        super().__init__(message)
        self.help = help


def check(source: Shape, target: Shape, methods: dict, stats: dict | None) -> None:
    """Raise SurgeryError unless ``target`` is a reachable cut of ``source`` with ``methods``."""
    for axis in ("family", "vocab", "head_dim"):
        if getattr(target, axis) != getattr(source, axis):
            raise SurgeryError(f"target {axis} {getattr(target, axis)} differs from the source's "
                               f"{getattr(source, axis)}", f"pruning cannot change {axis}; keep it as in the source")
    for axis in ("layers", "hidden", "ffn", "heads", "kv_heads"):
        new, old = getattr(target, axis), getattr(source, axis)
        if not 1 <= new <= old:
            raise SurgeryError(f"target {axis} {new} is not between 1 and the source's {old}",
                               "pruning only shrinks a model; give a size no larger than the source's")
    if target.heads % target.kv_heads:
        raise SurgeryError(f"{target.heads} heads do not divide into {target.kv_heads} KV heads",
                           "choose heads as a multiple of kv_heads")
    if target.heads // target.kv_heads > source.heads // source.kv_heads:
        raise SurgeryError(f"{target.heads // target.kv_heads} query heads per KV head exceeds the "
                           f"source's {source.heads // source.kv_heads}",
                           "GQA pruning drops KV groups or query heads within groups; it cannot regroup")
    for what, fix in config_errors(target):  # a checkpoint transformers would refuse to load
        raise SurgeryError(f"target {what}", fix)
    if source.tied_embeddings and not target.tied_embeddings:
        raise SurgeryError("untying embeddings is not supported (the model would grow)",
                           "set tied_embeddings to true for a tied source")
    changed = {"layers": source.layers != target.layers, "hidden": source.hidden != target.hidden,
               "ffn": source.ffn != target.ffn,
               "heads": (source.heads, source.kv_heads) != (target.heads, target.kv_heads)}
    for axis in METHODS:
        method = methods.get(axis)
        if method is not None and method not in METHODS[axis]:
            raise SurgeryError(f"unknown {axis} method {method!r}",
                               f"use one of: {', '.join(sorted(METHODS[axis]))}")
        if method is None and changed[axis]:
            raise SurgeryError(f"{axis} changes but no method is given for it",
                               f"set methods.{axis} to one of: {', '.join(sorted(METHODS[axis]))}")
        if method is not None and stats is not None and NEEDS[method] not in stats:
            raise SurgeryError(f"calibration stats lack {NEEDS[method]!r}, needed by {axis} method {method!r}",
                               "rerun calibrate with that score in config.scores")


@dataclass
class Basis:
    """The new residual-stream coordinates: a PCA rotation, a channel subset, or unchanged.

    A linear that *reads* the stream through an RMSNorm with gain g becomes W·diag(g)·Q (the
    gain is folded, so the norm weight can become a constant); a linear that *writes* the stream
    becomes Qᵀ·W. With a channel subset Q is a column selection, which commutes with diag(g),
    so gains are sliced instead of folded.

    ``gain`` compensates RMSNorm for the narrower stream. RMSNorm(x) = x·sqrt(d)/|x|. In the
    new coordinates y = Qᵀx, which keep a fraction r of E|x|² (|y|² ≈ r·|x|²), the pruned norm
    computes y·sqrt(k)/|y| ≈ y·sqrt(k)/(sqrt(r)·|x|), while the projection of the original
    norm's output is y·sqrt(d)/|x|. Every norm weight is therefore multiplied by sqrt(r·d/k):
    sqrt(old/new) when the dropped coordinates carry nothing (r = 1), and exactly 1 at full
    width, which keeps the rotation-only identity exact. r is pooled over all layers.

    ``final_gain`` is the final norm's weight (before ``gain``) when the head is tied to the
    embedding: see ``aligned_to_gain``.
    """

    rotation: torch.Tensor | None = None  # [d, k] orthonormal columns (pca)
    index: torch.Tensor | None = None  # [k] kept channels (channel)
    gain: float = 1.0
    final_gain: torch.Tensor | None = None  # [k] tied final norm weight under a rotation

    def read(self, w: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        if self.rotation is not None:
            return (w if g is None else w * g) @ self.rotation
        return w if self.index is None else w[:, self.index]

    def write(self, w: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            return self.rotation.T @ w
        return w if self.index is None else w[self.index]

    def norm(self, g: torch.Tensor) -> torch.Tensor:
        """The new weight of a norm whose gain was folded into its readers (pca) or is sliced."""
        if self.rotation is not None:
            return torch.full((self.rotation.shape[1],), self.gain)
        return g if self.index is None else g[self.index] * self.gain

    def tied_final_norm(self, g: torch.Tensor) -> torch.Tensor:
        """Final norm when the head is tied to the embedding and so cannot absorb the gain."""
        if self.rotation is None:
            return self.norm(g)
        return self.gain * self.final_gain


def aligned_to_gain(u: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis, final norm weight) for a tied head: the kept subspace span(u), re-based so that
    the final norm's gain ``g`` is as exact as a diagonal weight can make it.

    A tied head is the embedding E·Q, so the pruned logits are E·Q·diag(g')·Qᵀ·x̂ where the
    original's are E·diag(g)·x̂. PCA fixes the subspace, not the basis inside it: any Q = u·R
    (R orthogonal) keeps every layer exact. Taking R from the eigendecomposition of
    M = uᵀ·diag(g)·u = R·Λ·Rᵀ and g' = Λ makes Q·diag(g')·Qᵀ = P·diag(g)·P (P = u·uᵀ), the
    compression of diag(g) onto the kept subspace; the only error left is the part of
    diag(g)·x̂ that leaves it. At full width P = I, so a rotation without slicing is exact
    for any gain, negative ones included. (Keeping u's own basis and the diagonal of M, as a
    norm weight can hold, mixes channels of unequal gain: a tied 135M Llama with gains from
    −2.1 to 3.3 lost 1.8 nats at a 1.6% cut; measurements in docs/pruning.md.)
    """
    m = u.double().T @ (g.double()[:, None] * u.double())
    eigval, r = torch.linalg.eigh((m + m.T) / 2)
    return (u.double() @ r).to(u.dtype), eigval.float()


@dataclass
class Keep:
    """Everything a prune keeps, in the source's indices."""

    layers: list[int]
    basis: Basis
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept channels
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept query heads
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept KV heads
    report: dict = field(default_factory=dict)


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties: lower index first)."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k].sort().values


def choose_layers(method: str | None, stats: dict, n: int, k: int) -> tuple[list[int], dict]:
    if method is None or k == n:
        return list(range(n)), {}
    if method == "angular":
        dist = stats["angular_distance"]
        drop = n - k
        by_start = torch.stack([dist[i, i + drop] for i in range(n - drop + 1)])
        start = int(torch.argmin(by_start))  # ties: earliest block
        kept = [i for i in range(n) if not start <= i < start + drop]
        return kept, {"dropped_block": [start, start + drop], "distance_by_start": by_start.tolist()}
    scores = stats[method]  # highest kept: the layers that change their input most
    return top(scores, k).tolist(), {"scores": scores.tolist()}


def choose_basis(method: str | None, stats: dict, d: int, k: int,
                 tied_gain: torch.Tensor | None = None) -> tuple[Basis, dict]:
    """The hidden basis; ``tied_gain`` is the final norm's gain when the pruned head is tied."""
    if method is None:
        return Basis(), {}
    if method == "pca":
        eigval, eigvec = torch.linalg.eigh(stats["hidden_covariance"].double())
        eigval, eigvec = eigval.flip(0).clamp_min(0), eigvec.flip(1)  # descending variance
        kept = float(eigval[:k].sum() / eigval.sum())
        basis = Basis(rotation=eigvec[:, :k].float(), gain=(kept * d / k) ** 0.5)
        report = {"energy_kept": kept, "gain": basis.gain}
        if tied_gain is not None:
            basis.rotation, basis.final_gain = aligned_to_gain(eigvec[:, :k], tied_gain)
            basis.rotation = basis.rotation.float()
            report["tied_head"] = "gain-aligned basis"
        return basis, report
    index = top(stats["hidden_channel"], k)
    energy = stats["hidden_energy"].double()
    kept = float(energy[index].sum() / energy.sum())
    basis = Basis(index=index, gain=(kept * d / k) ** 0.5)
    return basis, {"channels": index.tolist(), "energy_kept": kept, "gain": basis.gain}


def choose_heads(scores: torch.Tensor, source: Shape, target: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA-aware head choice for one layer: whole KV groups first, then query heads within.

    A group's score is the L2 of its query heads' scores; the kept groups keep the same number
    of their best query heads, so every new KV head still serves a contiguous run of queries.
    """
    group = source.heads // source.kv_heads
    per_group = scores.view(source.kv_heads, group)
    kv = top(per_group.pow(2).sum(1), target.kv_heads)
    q = [g * group + top(per_group[g], target.heads // target.kv_heads) for g in kv.tolist()]
    return kv, torch.cat(q)


def decide(source: Shape, target: Shape, methods: dict, stats: dict,
           final_gain: torch.Tensor | None = None) -> Keep:
    """Pick what to keep along every axis (layers first: the others are read per kept layer).

    ``final_gain`` (the final norm's weight) is needed when the target's head is tied.
    """
    layers, layer_report = choose_layers(methods.get("layers"), stats, source.layers, target.layers)
    tied_gain = final_gain if target.tied_embeddings else None
    basis, hidden_report = choose_basis(methods.get("hidden"), stats, source.hidden, target.hidden, tied_gain)
    keep = Keep(layers=layers, basis=basis)
    for i in layers:
        if methods.get("ffn") and target.ffn != source.ffn:
            keep.ffn[i] = top(stats["ffn_activation"][i], target.ffn)
        if methods.get("heads") and (target.heads, target.kv_heads) != (source.heads, source.kv_heads):
            keep.kv_heads[i], keep.heads[i] = choose_heads(stats["heads"][i], source, target)
    keep.report = {
        "layers": {"method": methods.get("layers"), "kept": layers, **layer_report},
        "hidden": {"method": methods.get("hidden"), "size": target.hidden, **hidden_report},
        "ffn": {"method": methods.get("ffn"), "kept": {str(i): v.tolist() for i, v in keep.ffn.items()}},
        "heads": {"method": methods.get("heads"),
                  "kept": {str(i): v.tolist() for i, v in keep.heads.items()},
                  "kv_kept": {str(i): v.tolist() for i, v in keep.kv_heads.items()}},
    }
    return keep
