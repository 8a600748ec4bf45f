"""Logit-distillation and next-token losses computed in token chunks from final hidden states.

Owns the loss maths only (no models, no data). The [tokens x vocab] logits of teacher and
student never exist in full, in the forward pass or the backward pass.

Why chunking by hand: at vocab 131,072 a 16k-token micro-batch has 8.6 GB of fp32 logits per
model, and autograd would keep the student's log-softmax alive until backward. `_ChunkedLoss`
computes each chunk's logits, loss and *analytic* gradient with respect to the logits at once,
folds that gradient into d(hidden) and d(head weight), and drops the chunk. Backward then only
scales the stored gradients by the incoming scalar. The head matmul is done three times per
chunk (logits, d hidden, d weight), the same count as autograd would do.

Definitions (τ = temperature, u = z/τ the scaled student logits, p teacher, s student):

    forward_kl   τ² · Σ p (log p − log s)                      dL/dz = τ (s − p)
    reverse_kl   τ² · Σ s (log s − log p)                      dL/dz = τ s (d − Σ s d), d = log s − log p
    jsd          τ² · [β KL(p‖m) + (1−β) KL(s‖m)], m = βp + (1−β)s, β = 0.5
                                                                dL/dz = τ s (g − Σ s g), g = (1−β)(log s − log m)

The τ² factor keeps gradient magnitudes independent of τ (Hinton et al.), so changing τ does not
silently rescale the learning rate. With ``ce_weight`` w the loss is (1 − w)·KD + w·CE, where
CE is the plain next-token cross-entropy of the *unscaled* student logits (τ = 1).

Top-k: the teacher is renormalised over its k largest logits (exactly zero elsewhere). Forward KL
then compares it with the student's full-vocabulary log-softmax gathered on those k ids, so the
student's mass outside the support is still pushed down. Reverse KL and JSD would be infinite
against a teacher that is zero off-support, so for them the student is renormalised over the
same k ids. With k = vocab every form is exactly the full-vocabulary loss.

Token mask: a position whose label is ``IGNORE_INDEX`` counts for neither KD nor CE; the loss is
the mean over the remaining positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
JSD_BETA = 0.5
KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """The plan's ``config.loss``."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    ce_weight: float = 0.0
    top_k: int | None = None
    chunk_tokens: int = 1024

    @classmethod
    def from_config(cls, loss: dict | None) -> "LossSpec":
        loss = dict(loss or {})
        spec = cls(**{k: v for k, v in loss.items() if v is not None and k in cls.__dataclass_fields__})
        if spec.kind not in KINDS:
            raise ValueError(f"unknown distillation loss {spec.kind!r}; expected one of {', '.join(KINDS)}")
        return spec


@dataclass
class Teacher:
    """The teacher side of one micro-batch: hidden states + LM head, or cached top-k logits.

    ``values``/``indices`` are [tokens, k] raw logits (before temperature) and vocab ids.
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    teacher: Teacher | None = None,
) -> torch.Tensor:
    """Mean loss over unmasked tokens; differentiable in ``hidden`` [N, H] and ``weight`` [V, H].

    ``teacher=None`` gives plain next-token cross-entropy (control and bootstrap training).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    t = teacher or Teacher()
    flat = [x.reshape(-1, x.shape[-1]) if x is not None else None for x in (t.hidden, t.values, t.indices)]
    return _ChunkedLoss.apply(hidden, weight, labels, flat[0], t.weight, flat[1], flat[2], spec)


class _ChunkedLoss(torch.autograd.Function):
    """Gradients are computed in forward, chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, t_hidden, t_weight, t_values, t_indices, spec):
        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        count = max(int(keep.numel()), 1)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # loss maths in fp32 at least
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        w = weight.to(hidden.dtype)
        for rows in keep.split(spec.chunk_tokens):
            h = hidden[rows]
            z = (h @ w.T).to(acc)
            teacher_z, support = _teacher_chunk(rows, t_hidden, t_weight, t_values, t_indices, spec, z)
            loss, grad_z = chunk_loss_and_grad(z, labels[rows], spec, teacher_z, support)
            total += loss
            grad_z = grad_z.div_(count).to(h.dtype)
            grad_hidden[rows] = grad_z @ w
            grad_weight += (grad_z.T @ h).to(acc)
            del z, teacher_z, support, grad_z
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None, None, None, None


def _teacher_chunk(rows, t_hidden, t_weight, t_values, t_indices, spec, like):
    """Dense teacher logits for one chunk (−inf off the top-k support) and the support mask."""
    if t_hidden is None and t_values is None:
        return None, None
    dtype = like.dtype
    if t_hidden is not None:
        with torch.no_grad():
            t = (t_hidden[rows] @ t_weight.to(t_hidden.dtype).T).to(dtype)
        if not spec.top_k or spec.top_k >= t.shape[-1]:
            return t, None
        values, indices = t.topk(spec.top_k, dim=-1)
    else:
        values, indices = t_values[rows].to(dtype), t_indices[rows].long()
        if values.shape[-1] >= like.shape[-1]:
            return torch.empty_like(like).scatter_(-1, indices, values), None
    dense = torch.full_like(like, float("-inf")).scatter_(-1, indices, values)
    support = torch.zeros_like(like, dtype=torch.bool).scatter_(-1, indices, True)
    return dense, support


def chunk_loss_and_grad(z, labels, spec: LossSpec, teacher_z=None, support=None):
    """Summed loss of one chunk of student logits ``z`` [C, V] and dL/dz (not yet averaged).

    Works in place: ``z`` and ``teacher_z`` are overwritten (``z`` becomes the returned
    gradient), so a chunk costs about three [C, V] buffers, not the ten a naive version holds.
    """
    w = spec.ce_weight if teacher_z is not None else 1.0
    ce, ce_grad = _cross_entropy(z, labels) if w > 0.0 else (0.0, None)
    if w >= 1.0:
        return ce, ce_grad
    kd, grad = _kd(z, teacher_z, support, spec)
    if ce_grad is None:
        return kd, grad
    return (1.0 - w) * kd + w * ce, grad.mul_(1.0 - w).add_(ce_grad, alpha=w)


def _kd(z, teacher_z, support, spec: LossSpec):
    """KD loss and its gradient in ``z``'s storage (see the module docstring for the formulas)."""
    tau = spec.temperature
    if support is not None and spec.kind != "forward_kl":
        z.masked_fill_(~support, float("-inf"))  # the student renormalised over the top-k
    log_s = _log_softmax_(z.div_(tau))
    log_p = _log_softmax_(teacher_z.div_(tau))
    p = log_p.exp()
    log_p.masked_fill_(p == 0, 0.0)  # 0 · log 0 = 0 off the top-k support
    if spec.kind == "forward_kl":
        per_token = _rowdot(p, log_p) - _rowdot(p, log_s)
        grad = log_s.exp_().sub_(p)
    elif spec.kind == "reverse_kl":
        s = log_s.exp()
        d = log_s.sub_(log_p).masked_fill_(s == 0, 0.0)
        per_token = _rowdot(s, d)
        grad = d.sub_(per_token).mul_(s)
    else:
        s = log_s.exp()
        log_s.masked_fill_(s == 0, 0.0)
        m = p.mul(JSD_BETA).add_(s, alpha=1 - JSD_BETA)
        log_m = m.log().masked_fill_(m == 0, 0.0)
        del m
        per_token = JSD_BETA * (_rowdot(p, log_p) - _rowdot(p, log_m))
        per_token += (1 - JSD_BETA) * (_rowdot(s, log_s) - _rowdot(s, log_m))
        g = log_m.neg_().add_(log_s).mul_(1 - JSD_BETA).masked_fill_(s == 0, 0.0)
        grad = g.sub_(_rowdot(s, g)).mul_(s)
    return tau * tau * per_token.sum(), grad.mul_(tau)


def _cross_entropy(z, labels):
    log_s = torch.log_softmax(z, dim=-1)
    picked = log_s.gather(-1, labels[:, None])
    grad = log_s.exp_()
    grad.scatter_add_(-1, labels[:, None], torch.full_like(picked, -1.0))
    return -picked.sum(), grad


def _log_softmax_(x):
    """log_softmax in place (torch has no in-place variant; this saves a [C, V] buffer)."""
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _rowdot(a, b):
    """Σ_v a·b per row, [C, 1], as a batched matmul so no [C, V] product is materialised."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).squeeze(2)
