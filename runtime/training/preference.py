"""Preference-optimisation maths: summed sequence log-probabilities and the DPO losses (dpo, odpo).

Owns the loss formulas only; it must not generate, judge or load anything. Stages call
`sequence_logps` for the policy (with gradient) and the reference (under ``no_grad``), then
`dpo_loss` on the four results.

Losses. With Δ = (log π(a) − log π_ref(a)) − (log π(b) − log π_ref(b)) and p = P(a ≻ b):

    soft two-sided   L = −p·log σ(βΔ) − (1−p)·log σ(−βΔ)       dL/dΔ = β·(σ(βΔ) − p)
    sigmoid DPO      p = 1 (a is the chosen answer): L = −log σ(βΔ)

The soft form is the cross-entropy between the judge's win probability and the Bradley–Terry
probability σ(βΔ) that the policy's implicit reward ranks a over b; it is symmetric (swapping a
and b with p → 1 − p gives the same loss) and is minimal where σ(βΔ) = p, so a judge that is
unsure (p ≈ ½) pulls the two answers' margin to zero instead of pushing it to infinity as a
hard label would.

β-rescaling (``rescale=True``, the default): the loss is divided by β,

    L_β = L / β                   dL_β/dΔ = σ(βΔ) − p,   = (1 − 2p)/2 at Δ = 0 for every β.

Why: every run starts at Δ = 0 (the policy *is* the reference), and without the rescaling the
gradient there is β·(1 − 2p)/2, so a β sweep silently sweeps the learning rate too (β = 0.01
would train 10× slower than β = 0.1). Divided by β, the gradient with respect to the margin is
bounded by 1 and equal at the start for every β, so β only sets how far the policy may move
from the reference (the KL strength), not the step size: a β sweep needs no LR retuning. The
loss *value* at Δ = 0 is then log(2)/β; compare losses across β only through their gradients
or the reported margins. Ministral 3 names "β-rescaling" without giving its formula; this is
cascadec's choice (docs/runtime.md, "Preference optimisation").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd import _matmul_dtype


def dpo_loss(pi_a: torch.Tensor, pi_b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor, *,
             beta: float, p=None, rescale: bool = True) -> torch.Tensor:
    """Per-pair loss [B] (see the module docstring); ``p`` = P(a ≻ b) per pair, None = 1 (sigmoid DPO).

    Computed in at least float32 from log σ (never log of σ), so a large margin gives a finite loss
    and a p of exactly 0 or 1 drops its other term exactly (0 · finite).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dtype = torch.promote_types(pi_a.dtype, torch.float32)
    delta = ((pi_a.to(dtype) - ref_a.to(dtype)) - (pi_b.to(dtype) - ref_b.to(dtype))) * beta
    if p is None:
        loss = -F.logsigmoid(delta)
    else:
        p = torch.as_tensor(p, dtype=dtype, device=delta.device)
        if bool(((p < 0) | (p > 1) | p.isnan()).any()):
            raise ValueError(f"preference probabilities must lie in [0, 1], got {p.tolist()}")
        loss = -p * F.logsigmoid(delta) - (1 - p) * F.logsigmoid(-delta)
    return loss / beta if rescale else loss


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, *,
                   chunk_tokens: int = 1024) -> torch.Tensor:
    """Σ over positions t with ``loss_mask[:, t] == 1`` of log π(input_ids[t] | input_ids[<t]), [B] float32.

    ``model`` is a Hugging Face causal LM (unwrapped). Position ids follow the attention mask, so a
    left- or right-padded row scores exactly as the same row unpadded. The LM head is applied
    ``chunk_tokens`` scored positions at a time, in forward and in backward (`_TokenLogps`): only
    the scored rows' logits ever exist, one chunk of them at a time, never [B, T, V].
    """
    rows, _, token_logps, _ = scored_logps(model, input_ids, attention_mask, loss_mask, chunk_tokens=chunk_tokens)
    out = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, rows, token_logps)


def scored_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, *,
                 chunk_tokens: int = 1024, entropy: bool = False, temperature: float = 1.0):
    """Per scored token: ``(rows, cols, logps, entropies)`` where ``loss_mask[rows, cols + 1] == 1``
    (the hidden state at ``cols`` predicts token ``cols + 1``), ``logps`` [N] float32 and
    differentiable as in `sequence_logps`; ``entropies`` [N] of the model's next-token distribution
    there (no gradient, chunked the same way) when ``entropy``, else None."""
    if loss_mask.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"loss_mask {tuple(loss_mask.shape)} must have one shape")
    if bool(loss_mask[:, 0].any()):
        raise ValueError("loss_mask marks position 0, which has no preceding token to predict it from")
    if bool((loss_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("loss_mask marks padding (attention_mask 0)")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
    rows, cols = loss_mask[:, 1:].nonzero(as_tuple=True)  # the hidden state at t − 1 predicts token t
    scored, weight = hidden[rows, cols], model.get_output_embeddings().weight
    if temperature != 1.0:  # the sampling distribution softmax(z / T): (h / T) Wᵀ = z / T
        scored = scored / temperature
    token_logps = _TokenLogps.apply(scored, weight, input_ids[rows, cols + 1], chunk_tokens)
    entropies = None
    if entropy:
        entropies = _entropy(scored.detach(), weight.detach(), chunk_tokens)
    return rows, cols, token_logps, entropies


@torch.no_grad()
def _entropy(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """[N] float32 entropy of softmax(h Wᵀ) per row, the logits made one chunk at a time."""
    mm = _matmul_dtype(hidden)
    out = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(mm)
        for start in range(0, hidden.shape[0], chunk_tokens):
            logp = torch.log_softmax((hidden[start:start + chunk_tokens].to(mm) @ w.T).to(out.dtype), -1)
            out[start:start + chunk_tokens] = -(logp.exp() * logp).sum(-1)
    return out


class _TokenLogps(torch.autograd.Function):
    """log softmax(h Wᵀ)[label] per row, [N] float32, with the logits made one chunk at a time.

    Backward recomputes each chunk's logits: d logp/dz = onehot(label) − softmax(z), scaled by the
    row's incoming gradient (the pair's loss weight, only known then), folded into d h and d W. The
    head matmul runs four times per chunk (logits twice, d h, d W), as with activation checkpointing.
    Matmuls run in autocast's dtype when it is on (else the hidden states'), the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        mm = _matmul_dtype(hidden)
        out = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32),
                          device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(mm)
            for start in range(0, hidden.shape[0], chunk_tokens):
                z = (hidden[start:start + chunk_tokens].to(mm) @ w.T).to(out.dtype)
                rows = labels[start:start + chunk_tokens]
                out[start:start + chunk_tokens] = z.gather(-1, rows[:, None]).squeeze(1) - torch.logsumexp(z, -1)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_tokens, ctx.mm = chunk_tokens, mm
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        mm, acc = ctx.mm, grad_out.dtype
        grad_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(mm)
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                end = start + ctx.chunk_tokens
                h = hidden[start:end].to(mm)
                g = grad_out[start:end, None]
                grad_z = torch.softmax((h @ w.T).to(acc), -1).mul_(-g)
                grad_z.scatter_add_(-1, labels[start:end, None], g)
                grad_z = grad_z.to(mm)
                grad_hidden[start:end] = grad_z @ w
                grad_weight += (grad_z.T @ h).to(acc)
                del grad_z
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None
