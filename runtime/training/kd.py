"""Logit-distillation and next-token losses computed in token chunks from final hidden states.

Owns the loss maths only (no models, no data). The [tokens x vocab] logits of teacher and
student never exist in full, in the forward pass or the backward pass.

Why chunking by hand: at vocab 131,072 a 16k-token micro-batch has 8.6 GB of fp32 logits per
model, and autograd would keep the student's log-softmax alive until backward. `_ChunkedLoss`
computes each chunk's logits, loss and *analytic* gradient with respect to the logits at once,
folds that gradient into d(hidden) and d(head weight), and drops the chunk. Backward then only
scales the stored gradients by the incoming scalar. The head matmul is done three times per
chunk (logits, d hidden, d weight), the same count as autograd would do.

Definitions (τ = temperature, u = z/τ the scaled student logits, p teacher, s student), over
"buckets" b with teacher and student masses P_b, Q_b:

    forward_kl   τ² · Σ P (log P − log Q)                    dL/dw = τ (Q − P)
    reverse_kl   τ² · Σ Q (log Q − log P)                    dL/dw = τ Q (d − Σ Q d), d = log Q − log P
    jsd          τ² · [β KL(P‖M) + (1−β) KL(Q‖M)], M = βP + (1−β)Q, β = 0.5
                                                              dL/dw = τ Q (g − Σ Q g), g = (1−β)(log Q − log M)

where w_b = log Σ_{j∈b} exp(u_j) is the bucket's logit. Without top-k the buckets are the vocabulary
entries (w = u, P = p, Q = s). Everything is computed from log-probabilities (log-softmax),
never from log of a probability, so a teacher whose probabilities underflow (a full-vocabulary
teacher at τ < 1) still gives the exact divergence.

The τ² factor keeps gradient magnitudes independent of τ (Hinton et al.), so changing τ does not
silently rescale the learning rate. With ``ce_weight`` w the loss is (1 − w)·KD + w·CE, where
CE is the plain next-token cross-entropy of the *unscaled* student logits (τ = 1).

Top-k: k + 1 buckets, the teacher's k largest ids one each and the rest of the vocabulary as one
bucket. The teacher's rest mass comes from its log-sum-exp outside the top-k (computed online,
or stored by the teacher-logits cache); the student's from its own full-vocabulary log-softmax.
All three divergences are the divergences of these (k + 1)-bucket distributions, so the student
is pulled to the teacher's top-k masses *and* its rest mass, and nothing pushes the rest to zero.
Inside the rest bucket the gradient is spread in proportion to the student's own probabilities
(dL/du_j = dL/dw_rest · s_j / Q_rest). With k = vocab every form is exactly the full-vocabulary
loss.

Precision: autocast is off inside the loss. The head matmuls run in autocast's dtype when it is
on (else in the hidden states' dtype), the loss maths in fp32 at least, and the stored gradients
stay in fp32 until backward has multiplied them by the incoming scalar (which carries fp16's
loss scale), so fp16 gradients do not underflow before scaling.

Token mask: a position whose label is ``IGNORE_INDEX`` counts for neither KD nor CE; the loss is
the mean over the remaining positions.
"""

from __future__ import annotations

import math
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

    ``values``/``indices`` are [tokens, k] raw logits (before temperature) and vocab ids;
    ``rest`` [tokens] is the log-sum-exp of the teacher's logits divided by τ over the ids
    *outside* the top-k (−inf when k = vocab), which gives the rest bucket's mass.
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    rest: torch.Tensor | None = None


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: LossSpec,
    teacher: Teacher | None = None,
    parts: dict | None = None,
) -> torch.Tensor:
    """Mean loss over unmasked tokens; differentiable in ``hidden`` [N, H] and ``weight`` [V, H].

    ``teacher=None`` gives plain next-token cross-entropy (control and bootstrap training).
    ``parts``, when given, receives the unweighted means of the terms (``kd``, and ``ce`` when
    ``ce_weight`` > 0) as detached scalar tensors, for the metrics; the loss is ``(1 − w)·kd + w·ce``.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    t = teacher or Teacher()
    if t.values is not None and t.values.shape[-1] < weight.shape[0] and t.rest is None:
        raise ValueError("top-k teacher logits without the teacher's log-sum-exp outside the top-k "
                         "cannot give the unbiased (k+1)-bucket loss")
    flat = [x.reshape(-1, x.shape[-1]) if x is not None else None for x in (t.hidden, t.values, t.indices)]
    rest = t.rest.reshape(-1, 1) if t.rest is not None else None
    return _ChunkedLoss.apply(hidden, weight, labels, flat[0], t.weight, flat[1], flat[2], rest, spec, parts)


@torch.no_grad()
def nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats, fp32) and the count of unmasked tokens; no gradient.

    The evaluation twin of ``chunked_loss(..., teacher=None)``: logits exist one chunk of
    ``chunk_tokens`` rows at a time, computed in the hidden states' dtype as the model's own
    head would (bf16 weights give bf16 logits), then upcast for the log-softmax.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    w = weight.to(hidden.dtype)
    for start in range(0, hidden.shape[0], chunk_tokens):
        z = (hidden[start:start + chunk_tokens] @ w.T).float()
        rows = labels[start:start + chunk_tokens]
        total += (torch.logsumexp(z, dim=-1) - z.gather(-1, rows[:, None]).squeeze(1)).sum()
    return total, int(labels.numel())


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul of ``x`` here (its own dtype when autocast is off)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _ChunkedLoss(torch.autograd.Function):
    """Gradients are computed in forward, chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, t_hidden, t_weight, t_values, t_indices, t_rest, spec, parts):
        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        count = max(int(keep.numel()), 1)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # loss maths and gradients in fp32 at least
        mm = _matmul_dtype(hidden)
        t_mm = _matmul_dtype(t_hidden) if t_hidden is not None else None
        ctx.dtypes = hidden.dtype, weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            sums = {} if parts is not None else None
            w = weight.to(mm)
            teacher = (t_hidden, t_weight.to(t_mm) if t_hidden is not None else None, t_values, t_indices, t_rest)
            for rows in keep.split(spec.chunk_tokens):
                h = hidden[rows].to(mm)
                z = (h @ w.T).to(acc)
                log_p = _teacher_chunk(rows, *teacher, spec, z)
                loss, grad_z = chunk_loss_and_grad(z, labels[rows], spec, *log_p, parts=sums)
                total += loss
                scale = _fp16_scale(grad_z) if mm == torch.float16 else 1.0
                grad_z = (grad_z.mul_(scale) if scale != 1.0 else grad_z).to(mm)
                grad_hidden[rows] = (grad_z @ w).to(acc).div_(scale)
                grad_weight += (grad_z.T @ h).to(acc).div_(scale)
                del z, log_p, grad_z
        ctx.save_for_backward(grad_hidden.div_(count), grad_weight.div_(count))
        if parts is not None:
            parts.update({k: v / count for k, v in sums.items()})
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_out).to(hidden_dtype), (grad_weight * grad_out).to(weight_dtype),
                None, None, None, None, None, None, None, None)


def _fp16_scale(grad_z: torch.Tensor) -> float:
    """A power of two that brings the largest row's L1 norm of ``grad_z`` to (0.5, 1].

    The gradient is not yet divided by the token count, and near the teacher it is small: fp16
    would flush it to zero before the loss scale (applied in backward) could reach it. With each
    row's L1 norm at most 1, the products with the head and the hidden states cannot overflow.
    """
    norm = float(grad_z.abs().sum(-1).max())
    return 2.0 ** -math.ceil(math.log2(norm)) if norm > 0 and math.isfinite(norm) else 1.0


def _teacher_chunk(rows, t_hidden, t_weight, t_values, t_indices, t_rest, spec, like):
    """The teacher's log-probabilities at τ for one chunk, as ``(log_p, ids, log_p_rest)``.

    Dense [C, V] with ``ids=None`` without top-k (or k = vocab); otherwise [C, k] on the top-k
    ``ids`` and [C, 1] for the rest bucket. ``(None, None, None)`` without a teacher.
    """
    if t_hidden is None and t_values is None:
        return None, None, None
    tau, vocab = spec.temperature, like.shape[-1]
    if t_hidden is not None:
        with torch.no_grad():
            t = (t_hidden[rows].to(t_weight.dtype) @ t_weight.T).to(like.dtype).div_(tau)
        if not spec.top_k or spec.top_k >= vocab:
            return _log_softmax_(t), None, None
        values, ids = t.topk(spec.top_k, dim=-1)
        rest = torch.logsumexp(t.scatter_(-1, ids, float("-inf")), dim=-1, keepdim=True)
        del t
    else:
        values, ids = t_values[rows].to(like.dtype).div_(tau), t_indices[rows].long()
        if values.shape[-1] >= vocab:
            return _log_softmax_(torch.empty_like(like).scatter_(-1, ids, values)), None, None
        rest = t_rest[rows].to(like.dtype)
    lse = torch.logaddexp(torch.logsumexp(values, dim=-1, keepdim=True), rest)
    return values.sub_(lse), ids, rest.sub(lse)


def chunk_loss_and_grad(z, labels, spec: LossSpec, log_p=None, ids=None, log_p_rest=None, parts=None):
    """Summed loss of one chunk of student logits ``z`` [C, V] and dL/dz (not yet averaged).

    The teacher is given as `_teacher_chunk` returns it (``log_p=None``: cross-entropy only).
    Works in place: ``z`` and ``log_p`` are overwritten (``z`` becomes the returned gradient),
    so a chunk costs about three [C, V] buffers, not the ten a naive version holds.
    ``parts`` (a dict) accumulates the summed terms ``ce`` and ``kd`` that were computed.
    """
    w = spec.ce_weight if log_p is not None else 1.0
    ce, ce_grad = _cross_entropy(z, labels) if w > 0.0 else (0.0, None)
    if parts is not None and ce_grad is not None:
        parts["ce"] = parts.get("ce", 0.0) + ce.detach()
    if w >= 1.0:
        return ce, ce_grad
    kd, grad = _kd(z, log_p, ids, log_p_rest, spec)
    if parts is not None:
        parts["kd"] = parts.get("kd", 0.0) + kd.detach()
    if ce_grad is None:
        return kd, grad
    return (1.0 - w) * kd + w * ce, grad.mul_(1.0 - w).add_(ce_grad, alpha=w)


def _kd(z, log_p, ids, log_p_rest, spec: LossSpec):
    """KD loss and its gradient in ``z``'s storage: on the vocabulary, or on k + 1 buckets."""
    tau = spec.temperature
    log_s = _log_softmax_(z.div_(tau))
    if ids is None:
        per_token, grad = _divergence(log_p, log_s, spec.kind)
    else:
        log_q = log_s.gather(-1, ids)
        rest = log_s.scatter_(-1, ids, float("-inf"))  # the student's log-probabilities off the top-k
        log_q_rest = torch.logsumexp(rest, dim=-1, keepdim=True)
        per_token, bucket_grad = _divergence(torch.cat([log_p, log_p_rest], -1),
                                             torch.cat([log_q, log_q_rest], -1), spec.kind)
        # d w_rest / d u_j = s_j / Q_rest inside the rest bucket (0 when the rest has no mass).
        shift = torch.where(torch.isfinite(log_q_rest), log_q_rest, torch.zeros_like(log_q_rest))
        grad = rest.sub_(shift).exp_().mul_(bucket_grad[:, -1:])
        grad.scatter_(-1, ids, bucket_grad[:, :-1])
    return tau * tau * per_token.sum(), grad.mul_(tau)


def _divergence(log_p, log_q, kind: str):
    """Per-row divergence [C, 1] of distributions given by log-probabilities over the same buckets
    (teacher ``log_p``, student ``log_q``), and its gradient with respect to the student's bucket
    logits. Both inputs are overwritten. A bucket of zero mass contributes 0 (0 · log 0 = 0)."""
    if kind == "forward_kl":
        p = log_p.exp()
        per_token = _rowdot(p, log_p.sub_(log_q).masked_fill_(p == 0, 0.0))
        return per_token, log_q.exp_().sub_(p)
    q = log_q.exp()
    if kind == "reverse_kl":
        d = log_q.sub_(log_p).masked_fill_(q == 0, 0.0)
        per_token = _rowdot(q, d)
        return per_token, d.sub_(per_token).mul_(q)
    log_m = torch.logaddexp(log_p + math.log(JSD_BETA), log_q + math.log(1 - JSD_BETA))
    p = log_p.exp()
    per_token = JSD_BETA * _rowdot(p, log_p.sub_(log_m).masked_fill_(p == 0, 0.0))
    del p
    g = log_q.sub_(log_m).masked_fill_(q == 0, 0.0)
    del log_m
    per_token += (1 - JSD_BETA) * _rowdot(q, g)
    g.mul_(1 - JSD_BETA)
    return per_token, g.sub_(_rowdot(q, g)).mul_(q)


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
