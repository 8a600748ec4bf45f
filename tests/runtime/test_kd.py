"""The chunked KD/CE loss equals straightforward full-logit formulas: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cascadec.runtime.training.kd import IGNORE_INDEX, KINDS, LossSpec, Teacher, chunked_loss

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


def _buckets(log_probs, top):
    """Log-masses of the top-k ids and of everything else, [N, k + 1]."""
    rest = log_probs.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([log_probs.gather(-1, top), rest], -1)


def _divergence(log_p, log_s, kind):
    """The textbook per-row divergences (terms of zero mass dropped)."""
    p, s = log_p.exp(), log_s.exp()
    if kind == "forward_kl":
        return torch.where(p > 0, p * (log_p - log_s), 0.0).sum(-1)
    if kind == "reverse_kl":
        return torch.where(s > 0, s * (log_s - log_p), 0.0).sum(-1)
    log_m = torch.log(0.5 * p + 0.5 * s)
    return 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (s * (log_s - log_m)).sum(-1)


def _reference(hidden, weight, t_hidden, t_weight, labels, spec: LossSpec):
    """The textbook formulas on the full [N, V] logits, differentiated by autograd."""
    keep = labels != IGNORE_INDEX
    z = (hidden @ weight.T)[keep]
    t = (t_hidden @ t_weight.T)[keep]
    tau = spec.temperature
    t, u = t / tau, z / tau
    if spec.top_k:  # k + 1 buckets: the teacher's top-k ids one each, the rest of the vocabulary one
        top = t.topk(spec.top_k, dim=-1).indices
        log_p, log_s = _buckets(F.log_softmax(t, -1), top), _buckets(F.log_softmax(u, -1), top)
    else:
        log_p, log_s = F.log_softmax(t, -1), F.log_softmax(u, -1)
    kd = _divergence(log_p, log_s, spec.kind)
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
    logits = t_hidden @ t_weight.T
    values, indices = logits.topk(6, dim=-1)
    rest = logits.scatter(-1, indices, float("-inf")).logsumexp(-1)
    spec = LossSpec(top_k=6, chunk_tokens=5)
    online = chunked_loss(hidden, weight, labels, spec, Teacher(hidden=t_hidden, weight=t_weight))
    cached = chunked_loss(hidden, weight, labels, spec, Teacher(values=values, indices=indices.int(), rest=rest))
    torch.testing.assert_close(online, cached)


def test_cached_topk_without_the_rest_logsumexp_is_refused():
    hidden, weight, _, _, labels = _inputs(2)
    values, indices = torch.randn(N, 6, dtype=torch.float64), torch.randint(0, V, (N, 6))
    with pytest.raises(ValueError, match="without the teacher's log-sum-exp outside the top-k"):
        chunked_loss(hidden, weight, labels, LossSpec(top_k=6), Teacher(values=values, indices=indices))


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


def test_reverse_kl_of_an_underflowing_teacher_equals_float64():
    """At τ = 0.5 most of a peaked fp32 teacher's probabilities underflow to 0; log p must not."""
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(64, 8, generator=g)
    t_hidden, t_weight = 6 * torch.randn(6, 8, generator=g), 6 * torch.randn(64, 8, generator=g)
    labels = torch.randint(0, 64, (6,), generator=g)
    spec = LossSpec(kind="reverse_kl", temperature=0.5)
    assert (torch.softmax((t_hidden @ t_weight.T) / 0.5, -1) == 0).any()  # the case this test is about
    ours = chunked_loss(hidden, weight, labels, spec, Teacher(hidden=t_hidden, weight=t_weight))
    ref = _reference(hidden.double(), weight.double(), t_hidden.double(), t_weight.double(), labels, spec)
    assert float(ref) > 10.0
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)


def _max_error(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("spec", [LossSpec(), LossSpec(kind="reverse_kl", top_k=5, temperature=2.0),
                                  LossSpec(kind="jsd", ce_weight=0.2)], ids=lambda s: f"{s.kind}-k{s.top_k}")
def test_gradients_under_cpu_bf16_autocast_match_float64(spec):
    hidden, weight, t_hidden, t_weight, labels = _inputs(6)
    spec = LossSpec(**{**spec.__dict__, "chunk_tokens": 8})
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_loss(h, w, labels, spec, Teacher(hidden=t_hidden.float(), weight=t_weight.float()))
    loss.backward()
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _reference(ref_h, ref_w, t_hidden, t_weight, labels, spec)
    ref.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    value, expected = float(loss.detach()), float(ref.detach())
    assert abs(value - expected) < 0.02 * abs(expected)
    assert _max_error(h.grad, ref_h.grad) < 0.02 and _max_error(w.grad, ref_w.grad) < 0.02


def test_fp16_gradients_reach_the_loss_scale_before_they_are_rounded():
    """Under fp16 autocast with a loss scale, the small gradients of a student near its teacher
    over a 4096-token micro-batch (each entry below fp16's smallest number once divided by the
    token count) match float64; flushed to zero they would be off by about 80%."""
    g = torch.Generator().manual_seed(7)

    def fp16_exact(*shape, sd=1.0):
        return (sd * torch.randn(*shape, generator=g, dtype=torch.float64)).half().double()

    hidden, t_weight = fp16_exact(4096, 16, sd=0.05), fp16_exact(512, 16)
    weight = (t_weight + fp16_exact(512, 16, sd=0.1)).half().double()
    labels, spec, scale = torch.randint(0, 512, (4096,), generator=g), LossSpec(chunk_tokens=1024), 2.0**16
    h, w = hidden.half().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_loss(h, w, labels, spec, Teacher(hidden=hidden.half(), weight=t_weight.half()))
    (loss * scale).backward()
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    _reference(ref_h, ref_w, hidden, t_weight, labels, spec).backward()
    assert h.grad.dtype == torch.float16 and w.grad.dtype == torch.float32
    assert _max_error(h.grad.double() / scale, ref_h.grad) < 0.02
    assert _max_error(w.grad.double() / scale, ref_w.grad) < 0.02


@pytest.mark.parametrize("kind", KINDS)
def test_topk_distillation_keeps_the_teachers_topk_mass(kind):
    """A free student logit table distilled from a fixed teacher (V = 1000, k = 20, top-20 mass
    0.72) ends with the teacher's top-20 mass, not with all its mass on the top-20."""
    tokens, vocab, k, target = 8, 1000, 20, 0.72
    g = torch.Generator().manual_seed(8)
    teacher = 2 * torch.randn(tokens, vocab, generator=g, dtype=torch.float64)
    values, ids = teacher.topk(k, dim=-1)
    rest = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1)
    shift = math.log(target / (1 - target)) + rest - values.logsumexp(-1)  # top-20 mass = 0.72 exactly
    values = values + shift[:, None]
    teacher_mass = torch.softmax(teacher.scatter(-1, ids, values), -1).gather(-1, ids).sum(-1)
    torch.testing.assert_close(teacher_mass, torch.full((tokens,), target, dtype=torch.float64))
    cached = Teacher(values=values, indices=ids.int(), rest=rest)

    table = torch.nn.Parameter(torch.randn(vocab, tokens, generator=g, dtype=torch.float64))
    eye, labels = torch.eye(tokens, dtype=torch.float64), torch.zeros(tokens, dtype=torch.long)
    optimizer = torch.optim.Adam([table], lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        chunked_loss(eye, table, labels, LossSpec(kind=kind, top_k=k), cached).backward()
        optimizer.step()
    student_mass = torch.softmax(table.detach().T, -1).gather(-1, ids).sum(-1)
    assert (student_mass - target).abs().max() < 0.02
