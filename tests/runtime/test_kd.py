"""The chunked KD/CE loss equals straightforward full-logit formulas: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cascadec.runtime.kd import IGNORE_INDEX, LossSpec, Teacher, chunked_loss

N, H, HT, V = 23, 8, 6, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(N, HT, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, HT, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[3, 10, 22]] = IGNORE_INDEX
    return hidden, weight, t_hidden, t_weight, labels


def _reference(hidden, weight, t_hidden, t_weight, labels, spec: LossSpec):
    """The textbook formulas on the full [N, V] logits, differentiated by autograd."""
    keep = labels != IGNORE_INDEX
    z = (hidden @ weight.T)[keep]
    t = (t_hidden @ t_weight.T)[keep]
    tau = spec.temperature
    t, u = t / tau, z / tau
    if spec.top_k:  # renormalise the teacher over its top-k; reverse KL / JSD: the student too
        top = t.topk(spec.top_k, dim=-1).indices
        log_p = F.log_softmax(t.gather(-1, top), -1)
        log_s = F.log_softmax(u, -1).gather(-1, top)
        if spec.kind != "forward_kl":
            log_s = F.log_softmax(u.gather(-1, top), -1)
    else:
        log_p, log_s = F.log_softmax(t, -1), F.log_softmax(u, -1)
    p, s = log_p.exp(), log_s.exp()
    if spec.kind == "forward_kl":
        kd = (p * (log_p - log_s)).sum(-1)
    elif spec.kind == "reverse_kl":
        kd = (s * (log_s - log_p)).sum(-1)
    else:
        log_m = torch.log(0.5 * p + 0.5 * s)
        kd = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (s * (log_s - log_m)).sum(-1)
    kd = tau * tau * kd.mean()
    ce = F.cross_entropy(z, labels[keep])
    return (1 - spec.ce_weight) * kd + spec.ce_weight * ce


CASES = [
    LossSpec(kind="forward_kl"),
    LossSpec(kind="reverse_kl"),
    LossSpec(kind="jsd"),
    LossSpec(kind="forward_kl", temperature=2.0),
    LossSpec(kind="reverse_kl", temperature=0.7, ce_weight=0.3),
    LossSpec(kind="jsd", temperature=1.5, ce_weight=0.5),
    LossSpec(kind="forward_kl", ce_weight=0.25),
    LossSpec(kind="forward_kl", top_k=5),
    LossSpec(kind="reverse_kl", top_k=5, temperature=2.0),
    LossSpec(kind="jsd", top_k=7, ce_weight=0.1),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.kind}-t{s.temperature}-w{s.ce_weight}-k{s.top_k}")
@pytest.mark.parametrize("chunk", [4, 1000])
def test_matches_full_logit_formula(spec, chunk):
    hidden, weight, t_hidden, t_weight, labels = _inputs()
    spec = LossSpec(**{**spec.__dict__, "chunk_tokens": chunk})
    a = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    b = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    ours = chunked_loss(a[0], a[1], labels, spec, Teacher(hidden=t_hidden, weight=t_weight))
    ref = _reference(b[0], b[1], t_hidden, t_weight, labels, spec)
    (3.0 * ours).backward()
    (3.0 * ref).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[0].grad, b[0].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a[1].grad, b[1].grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_cached_topk_at_full_vocab_equals_full_loss(kind):
    hidden, weight, t_hidden, t_weight, labels = _inputs(1)
    logits = t_hidden @ t_weight.T
    values, indices = logits.topk(V, dim=-1)
    full = chunked_loss(hidden, weight, labels, LossSpec(kind=kind), Teacher(hidden=t_hidden, weight=t_weight))
    cached = chunked_loss(hidden, weight, labels, LossSpec(kind=kind, top_k=V), Teacher(values=values, indices=indices.int()))
    torch.testing.assert_close(full, cached, rtol=1e-12, atol=0)


def test_cached_topk_equals_online_topk():
    hidden, weight, t_hidden, t_weight, labels = _inputs(2)
    values, indices = (t_hidden @ t_weight.T).topk(6, dim=-1)
    spec = LossSpec(top_k=6, chunk_tokens=5)
    online = chunked_loss(hidden, weight, labels, spec, Teacher(hidden=t_hidden, weight=t_weight))
    cached = chunked_loss(hidden, weight, labels, spec, Teacher(values=values, indices=indices.int()))
    torch.testing.assert_close(online, cached)


def test_cross_entropy_only_matches_torch():
    hidden, weight, _, _, labels = _inputs(3)
    h = hidden.clone().requires_grad_()
    loss = chunked_loss(h, weight, labels, LossSpec(chunk_tokens=3))
    ref_h = hidden.clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ weight.T, labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, ref_h.grad)


def test_identical_teacher_and_student_gives_zero_forward_kl():
    hidden, weight, _, _, labels = _inputs(4)
    loss = chunked_loss(hidden, weight, labels, LossSpec(), Teacher(hidden=hidden, weight=weight))
    assert abs(float(loss)) < 1e-12
