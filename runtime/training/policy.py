"""GRPO arithmetic on tensors: advantages, the clipped objective, its normalisers and its metrics.

Owns the formulas only; it must not generate, score or load anything. The grpo stage calls, per
batch: `advantages` (after dropping the groups `constant_groups` finds), `sequence_weights`, then per
micro-batch `token_loss` on the per-token log-probabilities of the policy, and sums the results.

Notation: a batch holds K groups of G completions o_i of one prompt each, rewards r_i, completion
masks m_{i,t} (1 on the tokens that count), ratio ρ_{i,t} = π_θ(o_{i,t}) / π_old(o_{i,t}).

Advantages (`advantages`), with μ_g the group's mean reward:

    A_i = r_i − μ_g                                          then, by ``scale``:
    none        A_i                                          (Dr. GRPO; TRL ``scale_rewards="none"``)
    group       A_i / (std_g(r) + 1e-4)                      (TRL ``"group"``, GRPO's original)
    batch       A_i / (std_batch(r) + 1e-4)                  (TRL ``"batch"``: std of the *raw* rewards)
    minibatch   (A_i − mean_mb(A)) / (std_mb(A) + 1e-4)      (Magistral §2.1: re-centred and scaled by
                                                              the centred advantages' own spread over
                                                              the minibatch's sequences)

Every std is Bessel-corrected (TRL's ``nanstd``). The minibatch is the whole batch, since the
stage makes one optimiser step per batch (Magistral's n_batch = n_minibatch); it is computed over
the batch *before* it is cut into micro-batches, so gradient accumulation changes nothing.

Per-token loss (`token_loss`), ε_low = ``epsilon``, ε_high = ``epsilon_high``:

    l_{i,t} = −min(ρ_{i,t}·A_i, clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high)·A_i) + β·k3_{i,t}
    k3_{i,t} = exp(ref_{i,t} − logp_{i,t}) − (ref_{i,t} − logp_{i,t}) − 1      (only when β > 0)

Normalisers: the loss is L = Σ_i w_i Σ_t m_{i,t}·l_{i,t} with one weight per sequence
(`sequence_weights`), B the batch's sequences, |o_i| = Σ_t m_{i,t}, T_max = max_completion_length:

    grpo       w_i = 1 / (B · max(|o_i|, 1))        mean over each sequence, then over sequences
    dr_grpo    w_i = 1 / (B · T_max)
    dapo       w_i = 1 / max(Σ_j |o_j|, 1)           every token of the batch weighs the same
    magistral  w_i = 1 / (K · Σ_{j ∈ g(i)} |o_j|)    token sum ÷ the group's total length, then the
                                                     mean over the K groups (Magistral §2.1)

These are TRL's (trl/trainer/grpo_trainer.py, ``GRPOTrainer._compute_loss``) for one process
and one generation batch per optimiser step; because the weights are fixed per batch, a loss
summed over micro-batches equals the loss of the batch in one piece (no per-micro-batch mean),
and so does its gradient. Groups whose rewards are all equal carry no signal (A = 0 for every
member) and are dropped before any of this: they are in no mean, no std and no denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cascadec.grpo import LOSS_TYPES, SCALES  # noqa: F401 (the names the plan may use)
STD_EPS = 1e-4  # TRL's: keeps a group (or batch) whose rewards barely differ finite


def _std(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Bessel-corrected std (TRL's ``nanstd`` on NaN-free input); 0 for a single value."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros(() if dim is None else x.shape[:dim] + x.shape[dim + 1:], dtype=x.dtype,
                           device=x.device)
    return x.std(dim=dim, unbiased=True) if dim is not None else x.std(unbiased=True)


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[K] bool: the groups whose G rewards are all equal (exactly; rewards are checker outputs)."""
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def kept_rows(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices of the completions in groups that are not constant (the rows the batch keeps)."""
    keep = ~constant_groups(rewards, group_size)
    return keep.repeat_interleave(group_size).nonzero().squeeze(1)


def advantages(rewards: torch.Tensor, group_size: int, scale: str = "minibatch") -> torch.Tensor:
    """[K·G] advantages of ``rewards`` [K·G] (groups contiguous), see the module docstring.

    Computed in float64 for float64 input, else float32.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    grouped = _grouped(r, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        return centred / (_std(grouped, dim=1) + STD_EPS).repeat_interleave(group_size)
    if scale == "batch":
        return centred / (_std(r) + STD_EPS)
    return (centred - centred.mean()) / (_std(centred) + STD_EPS)


def sequence_weights(mask: torch.Tensor, group_size: int, loss_type: str = "magistral", *,
                     max_completion_length: int | None = None) -> torch.Tensor:
    """[B] float64 weight per sequence so that the batch loss is Σ_i w_i Σ_t m_{i,t}·l_{i,t}.

    ``mask`` [B, T] is the whole batch's completion mask (groups contiguous, truncated completions
    already masked out when asked); see the module docstring for each ``loss_type``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    lengths = mask.to(torch.float64).sum(dim=1)
    count = lengths.shape[0]
    if loss_type == "grpo":
        return 1.0 / (count * lengths.clamp(min=1.0))
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        return torch.full_like(lengths, 1.0 / (count * max_completion_length))
    if loss_type == "dapo":
        return torch.full_like(lengths, 1.0 / float(lengths.sum().clamp(min=1.0)))
    per_group = _grouped(lengths, group_size).sum(dim=1)
    groups = per_group.shape[0]
    weights = torch.where(per_group > 0, 1.0 / (groups * per_group.clamp(min=1.0)), torch.zeros_like(per_group))
    return weights.repeat_interleave(group_size)


@dataclass
class LossParts:
    """One micro-batch's contribution: ``loss`` (to backpropagate) and sums for the metrics.

    Every ``*_sum`` counts masked tokens, so micro-batches add up to the batch's figures.
    """

    loss: torch.Tensor
    tokens: float
    clipped_low: float
    clipped_high: float
    kl_sum: float


def token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               weights: torch.Tensor, *, epsilon: float = 0.2, epsilon_high: float | None = None,
               beta: float = 0.0, ref_logps: torch.Tensor | None = None) -> LossParts:
    """Σ_i w_i Σ_t m_{i,t}·l_{i,t} over the micro-batch (module docstring), differentiable in ``logps``.

    ``logps``, ``old_logps``, ``ref_logps`` and ``mask`` are [B, T]; ``advantages`` and ``weights``
    [B]. A token counts as clipped low when ρ < 1 − ε_low and A < 0, high when ρ > 1 + ε_high and
    A > 0 (where the clip removes its gradient), as TRL counts them.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs the reference's log-probs")
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps = logps.to(dtype)
    adv = advantages.to(dtype)[:, None]
    m = mask.to(dtype)
    ratio = torch.exp(logps - old_logps.to(dtype))
    clipped = ratio.clamp(1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl_sum = 0.0
    if beta > 0:
        delta = ref_logps.to(dtype) - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        kl_sum = float((kl.detach() * m).sum())
    loss = ((per_token * m).sum(dim=1) * weights.to(dtype)).sum()
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(dtype)
        up = ((ratio > 1 + high) & (adv > 0)).to(dtype)
        return LossParts(loss=loss, tokens=float(m.sum()), clipped_low=float((low * m).sum()),
                         clipped_high=float((up * m).sum()), kl_sum=kl_sum)


def truncated(finishes: list[str]) -> torch.Tensor:
    """[B] bool: completions that did not end on their own (finish "length" or "loop"): TRL's
    ``mask_truncated_completions`` masks those whose last token is not EOS; cascadec also counts a
    stop string as an ending."""
    return torch.tensor([f not in ("eos", "stop") for f in finishes], dtype=torch.bool)


def reward_stats(per_reward: dict[str, list[float | None]]) -> dict[str, float]:
    """``reward/<name>/mean`` and ``/std`` (population) over the completions a reward applied to."""
    out: dict[str, float] = {}
    for name, values in per_reward.items():
        vals = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
        if vals.numel():
            out[f"reward/{name}/mean"] = float(vals.mean())
            out[f"reward/{name}/std"] = float(vals.std(unbiased=False))
    return out


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} values do not split into groups of {group_size}")
    return x.reshape(-1, group_size)
