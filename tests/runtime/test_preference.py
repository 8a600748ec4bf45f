"""DPO losses and sequence log-probs: equal to TRL's DPO loss, to closed forms and to full-logit float64."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cascadec.runtime.surgery import adapters
from cascadec.runtime.training.preference import dpo_loss, sequence_logps

import surgery_util

B = 16


def _logps(seed=0, n=B):
    """Summed log-probs of answers a and b under a policy and a reference, float64, < 0."""
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]


def _trl_sigmoid_loss(pi_c, pi_r, ref_c, ref_r, beta):
    """TRL's DPOTrainer loss (`loss_type="sigmoid"`) on given sequence log-probs.

    TRL exposes no standalone loss function: the formula lives in `DPOTrainer._compute_loss`, which
    reads per-token log-probs from the model's fused-head output and, with
    `precompute_ref_logps`, the reference log-probs from the batch. It is called here unbound, on a
    stand-in trainer and a stand-in model whose per-token log-probs sum to the given ones.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    n, T = pi_c.shape[0], 4
    split = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    per_token = torch.cat([pi_c, pi_r])[:, None] * split  # [2n, T], each row sums to its log-prob
    zeros = torch.zeros(2 * n, T, dtype=torch.float64)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                              is_top1=torch.zeros(2 * n, T, dtype=torch.bool))
    identity = lambda x: x  # noqa: E731 (one process: gathering is the identity)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                          gather_for_metrics=identity),
        aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.ones(2 * n, T + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, T + 1, dtype=torch.long),
              "completion_mask": torch.ones(2 * n, T + 1, dtype=torch.long),
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_certain_preference_is_sigmoid_dpo_and_trls_dpo_loss(beta):
    pi_a, pi_b, ref_a, ref_b = _logps()
    sigmoid = dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=beta, rescale=False)
    delta = (pi_a - ref_a) - (pi_b - ref_b)
    torch.testing.assert_close(sigmoid, -F.logsigmoid(beta * delta), rtol=0, atol=1e-15)
    ones, zeros = torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    assert torch.equal(dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=beta, p=ones, rescale=False), sigmoid)
    # p = 0: b is the chosen answer
    assert torch.equal(dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=beta, p=zeros, rescale=False),
                       dpo_loss(pi_b, pi_a, ref_b, ref_a, beta=beta, rescale=False))
    trl = _trl_sigmoid_loss(pi_a, pi_b, ref_a, ref_b, beta)
    torch.testing.assert_close(sigmoid.mean(), trl, rtol=1e-12, atol=0)
    torch.testing.assert_close(dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=beta, p=zeros, rescale=False).mean(),
                               _trl_sigmoid_loss(pi_b, pi_a, ref_b, ref_a, beta), rtol=1e-12, atol=0)
    # rescaled: the same loss divided by β
    torch.testing.assert_close(dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=beta, p=ones), sigmoid / beta,
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("rescale", [True, False])
def test_swapping_answers_with_the_complement_probability_leaves_the_loss_unchanged(rescale):
    pi_a, pi_b, ref_a, ref_b = _logps(1)
    p = torch.rand(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p[:3] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    ab = dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=0.3, p=p, rescale=rescale)
    ba = dpo_loss(pi_b, pi_a, ref_b, ref_a, beta=0.3, p=1 - p, rescale=rescale)
    torch.testing.assert_close(ab, ba, rtol=1e-14, atol=0)
    # and p = ½ is indifferent to the order by construction: L = −½ log σ(βΔ)σ(−βΔ) / β
    half = dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=0.3, p=torch.full((B,), 0.5, dtype=torch.float64),
                    rescale=rescale)
    delta = 0.3 * ((pi_a - ref_a) - (pi_b - ref_b))
    expected = -0.5 * (F.logsigmoid(delta) + F.logsigmoid(-delta)) / (0.3 if rescale else 1.0)
    torch.testing.assert_close(half, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_beta_rescaling_makes_the_starting_gradient_independent_of_beta(beta):
    """At Δ = 0 (policy = reference) dL/dΔ = (1 − 2p)/2 for every β; β·(1 − 2p)/2 without rescaling."""
    p = torch.tensor([0.0, 0.1, 0.5, 0.8, 1.0], dtype=torch.float64)
    for rescale, scale in ((True, 1.0), (False, beta)):
        pi_a = torch.full((5,), -7.0, dtype=torch.float64, requires_grad=True)
        same = torch.full((5,), -7.0, dtype=torch.float64)
        dpo_loss(pi_a, same, same, same, beta=beta, p=p, rescale=rescale).sum().backward()
        torch.testing.assert_close(pi_a.grad, scale * (1 - 2 * p) / 2, rtol=1e-14, atol=0)
    # and |dL/dΔ| ≤ 1 at any margin once rescaled: σ(βΔ) − p
    delta = torch.tensor([-1e4, -30.0, 0.3, 30.0, 1e4], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(5, dtype=torch.float64)
    loss = dpo_loss(delta, zero, zero, zero, beta=beta, p=p)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(delta.grad, torch.sigmoid(beta * delta.detach()) - p, rtol=1e-12, atol=1e-15)


def test_gradients_equal_the_closed_form_and_float64_finite_differences():
    pi_a, pi_b, ref_a, ref_b = (x.requires_grad_() for x in _logps(3, 6))
    p = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.95, 1.0], dtype=torch.float64)
    beta = 0.2
    loss = dpo_loss(pi_a, pi_b, ref_a, ref_b, beta=beta, p=p)
    grads = torch.autograd.grad(loss.sum(), (pi_a, pi_b, ref_a, ref_b))
    delta = ((pi_a - ref_a) - (pi_b - ref_b)).detach()
    g = torch.sigmoid(beta * delta) - p  # dL/dΔ, rescaled
    for got, sign in zip(grads, (1, -1, -1, 1)):
        torch.testing.assert_close(got, sign * g, rtol=1e-13, atol=1e-15)
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=beta, p=p), (pi_a, pi_b, ref_a, ref_b))
    # float32 inputs give float32 losses that agree with float64
    loss32 = dpo_loss(*(x.detach().float() for x in (pi_a, pi_b, ref_a, ref_b)), beta=beta, p=p.float())
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss.detach(), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"^preference probabilities must lie in \[0, 1\], got \[0.5, 1.5\]$"):
        dpo_loss(x, x, x, x, beta=0.1, p=[0.5, 1.5])
    with pytest.raises(ValueError, match=r"^beta must be > 0, got 0.0$"):
        dpo_loss(x, x, x, x, beta=0.0)


# ---------------------------------------------------------------------------------------------
# sequence_logps


def _batch():
    """Three rows of different lengths, right- and left-padded, each scoring its last tokens."""
    ids = surgery_util.ids(3, 14, seed=5)
    lengths, pads, scored = [14, 9, 11], ["right", "right", "left"], [6, 4, 10]
    attention = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    rows = []
    for r, (n, pad, k) in enumerate(zip(lengths, pads, scored)):
        span = slice(0, n) if pad == "right" else slice(14 - n, 14)
        ids[r, :span.start] = 0
        ids[r, span.stop:] = 0
        attention[r, span] = 1
        loss[r, span.stop - k:span.stop] = 1
        rows.append((ids[r, span], loss[r, span]))
    return ids, attention, loss, rows


def _reference(model, rows):
    """Each row alone, unpadded, through the model's own full logits."""
    out = []
    for ids, mask in rows:
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
        out.append((logp.gather(-1, ids[1:, None]).squeeze(1) * mask[1:]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_logps_equal_full_logits_in_float64_with_their_gradients(tmp_path, tied):
    model = adapters.load_model(surgery_util.model(tmp_path, "mistral", tied=tied), dtype=torch.float64)
    ids, attention, loss_mask, rows = _batch()
    model.lm_head.register_forward_hook(lambda *_: pytest.fail("the LM head module ran: full logits"))
    got = sequence_logps(model, ids, attention, loss_mask, chunk_tokens=3)  # 20 rows: 7 chunks
    weights = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((got * weights).sum(), params)
    model._forward_hooks.clear()
    model.lm_head._forward_hooks.clear()
    ref = _reference(model, rows)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (got - ref).abs().max() < 1e-10
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_sequence_logps_of_a_bf16_checkpoint_match_its_own_bf16_logits(tmp_path):
    model = adapters.load_model(surgery_util.model(tmp_path, "llama", bf16=True), dtype=torch.bfloat16)
    ids, attention, loss_mask, rows = _batch()
    got = sequence_logps(model, ids, attention, loss_mask, chunk_tokens=8)
    with torch.no_grad():
        ref = _reference(model, rows)  # the head's bf16 logits, then log-softmax in float64
    assert got.dtype == torch.float32 and got.requires_grad
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-4)


def test_loss_mask_errors():
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="^loss_mask marks position 0, which has no preceding token"):
        sequence_logps(None, ids, torch.ones_like(ids), torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"^loss_mask marks padding \(attention_mask 0\)$"):
        sequence_logps(None, ids, torch.tensor([[1, 1, 0, 0]]), torch.tensor([[0, 1, 1, 0]]))
