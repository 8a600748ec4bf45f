"""GRPO arithmetic (runtime/training/policy.py) against direct float64 formulas and TRL's own loss code."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from cascadec.runtime.training import policy

G = 4
# three groups of four; the middle one is constant (every member scored 0.5)
REWARDS = [1.0, 0.0, 0.1, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 1.1, -0.1]


def _direct_advantages(rewards, g, scale):
    """The textbook formulas, one Python float at a time."""
    groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
    centred = [r - statistics.fmean(grp) for grp in groups for r in grp]
    if scale == "none":
        return centred
    if scale == "group":
        return [c / (statistics.stdev(groups[i // g]) + 1e-4) for i, c in enumerate(centred)]
    if scale == "batch":
        return [c / (statistics.stdev(rewards) + 1e-4) for c in centred]
    mean, std = statistics.fmean(centred), statistics.stdev(centred)
    return [(c - mean) / (std + 1e-4) for c in centred]


@pytest.mark.parametrize("scale", policy.SCALES)
def test_advantages_equal_the_direct_float64_formulas(scale):
    got = policy.advantages(torch.tensor(REWARDS, dtype=torch.float64), G, scale)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(_direct_advantages(REWARDS, G, scale), rel=1e-12, abs=1e-12)


def test_minibatch_normalisation_has_zero_mean_and_unit_spread():
    adv = policy.advantages(torch.tensor(REWARDS, dtype=torch.float64), G, "minibatch")
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-12)
    centred = _direct_advantages(REWARDS, G, "none")
    assert float(adv.std()) == pytest.approx(statistics.stdev(centred) / (statistics.stdev(centred) + 1e-4))


def test_constant_groups_and_kept_rows():
    r = torch.tensor(REWARDS)
    assert policy.constant_groups(r, G).tolist() == [False, True, False]
    assert policy.kept_rows(r, G).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="12 values do not split into groups of 5"):
        policy.constant_groups(r, 5)


def _batch(seed=0, rows=8, width=6):
    """Per-token log-probs of the policy and of the sampler, ragged masks, advantages."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3
    logps = old + (torch.rand(rows, width, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ρ in ~[0.67, 1.5]
    lengths = [6, 2, 5, 1, 3, 6, 4, 2][:rows]
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)
    adv = torch.tensor([0.9, -1.2, 0.3, -0.4, 1.5, -0.7, 0.2, -0.6][:rows], dtype=torch.float64)
    return logps, old, mask, adv


def _direct_loss(logps, old, mask, adv, weights, eps_low, eps_high, beta=0.0, ref=None):
    total = 0.0
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if mask[i, t] == 0:
                continue
            rho = math.exp(float(logps[i, t] - old[i, t]))
            a = float(adv[i])
            term = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            if beta:
                d = float(ref[i, t] - logps[i, t])
                term += beta * (math.exp(d) - d - 1)
            total += float(weights[i]) * term
    return total


def test_magistral_normaliser_is_token_sum_over_each_groups_length_then_mean_over_groups():
    logps, old, mask, adv = _batch()
    w = policy.sequence_weights(mask, G, "magistral")
    # lengths 6 2 5 1 | 3 6 4 2: groups of 14 and 15 tokens
    assert w.tolist() == pytest.approx([1 / (2 * 14)] * 4 + [1 / (2 * 15)] * 4, rel=1e-15)
    got = policy.token_loss(logps, old, adv, mask, w, epsilon=0.2, epsilon_high=0.28).loss
    direct = 0.0
    for grp in range(2):
        rows = range(grp * G, grp * G + G)
        group_len = sum(float(mask[i].sum()) for i in rows)
        one = [1.0 if i in rows else 0.0 for i in range(8)]
        direct += _direct_loss(logps, old, mask, adv, one, 0.2, 0.28) / group_len
    assert float(got) == pytest.approx(direct / 2, rel=1e-12)


def test_clip_low_and_high_cut_the_gradient_and_are_counted():
    # four one-token sequences: ρ = 1.5 with A > 0 (clipped high at 1.28), ρ = 0.5 with A < 0 (clipped
    # low at 0.8), ρ = 1.5 with A < 0 and ρ = 0.5 with A > 0 (the min keeps the unclipped term)
    old = torch.zeros(4, 1, dtype=torch.float64)
    logps = torch.log(torch.tensor([[1.5], [0.5], [1.5], [0.5]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    parts = policy.token_loss(logps, old, adv, mask, w, epsilon=0.2, epsilon_high=0.28)
    assert float(parts.loss.detach()) == pytest.approx(-1.28 + 0.8 + 1.5 - 0.5, rel=1e-12)
    parts.loss.backward()
    # d/dlogp of −ρ·A = −ρ·A; zero where the clipped term is the minimum
    assert logps.grad.squeeze(1).tolist() == pytest.approx([0.0, 0.0, 1.5, -0.5], abs=1e-12)
    assert (parts.tokens, parts.clipped_low, parts.clipped_high) == (4.0, 1.0, 1.0)


def test_epsilon_high_defaults_to_epsilon():
    old = torch.zeros(1, 1, dtype=torch.float64)
    logps = torch.log(torch.tensor([[1.5]], dtype=torch.float64))
    one = torch.ones(1, dtype=torch.float64)
    parts = policy.token_loss(logps, old, one, torch.ones(1, 1), one, epsilon=0.2)
    assert float(parts.loss) == pytest.approx(-1.2, rel=1e-12)


@pytest.mark.parametrize("loss_type", ["magistral", "grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_the_direct_float64_computation(loss_type, beta):
    logps, old, mask, adv = _batch(seed=3)
    ref = old - 0.1 * torch.arange(6, dtype=torch.float64)
    w = policy.sequence_weights(mask, G, loss_type, max_completion_length=6)
    got = policy.token_loss(logps, old, adv, mask, w, epsilon=0.2, epsilon_high=0.28, beta=beta, ref_logps=ref)
    assert float(got.loss) == pytest.approx(_direct_loss(logps, old, mask, adv, w, 0.2, 0.28, beta, ref), rel=1e-12)


def _trl_loss(loss_type, logps, old, mask, adv, *, beta=0.0, ref=None, epsilon=0.2, epsilon_high=0.28,
              max_completion_length=6):
    """TRL's own `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py) on the same tensors: the
    model forward is replaced by the per-token log-probs, everything after it is TRL's code."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                  gather_for_metrics=lambda x: x, sync_gradients=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, use_vllm=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=accelerator,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)})
    rows = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1),
              "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trls_on_the_same_tensors(loss_type, beta):
    logps, old, mask, adv = _batch(seed=5)
    ref = old + 0.05
    mine_logps = logps.clone().requires_grad_()
    trl_logps = logps.clone().requires_grad_()
    w = policy.sequence_weights(mask, G, loss_type, max_completion_length=6)
    mine = policy.token_loss(mine_logps, old, adv, mask, w, epsilon=0.2, epsilon_high=0.28, beta=beta, ref_logps=ref)
    theirs, metrics = _trl_loss(loss_type, trl_logps, old, mask, adv, beta=beta, ref=ref)
    assert float(mine.loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12)
    mine.loss.backward()
    theirs.backward()
    torch.testing.assert_close(mine_logps.grad, trl_logps.grad, rtol=1e-12, atol=1e-15)
    assert mine.clipped_low / mine.tokens == pytest.approx(metrics["clip_ratio/low_mean"][0], rel=1e-12)
    assert mine.clipped_high / mine.tokens == pytest.approx(metrics["clip_ratio/high_mean"][0], rel=1e-12)
    assert mine.clipped_low > 0 and mine.clipped_high > 0


def test_trl_advantage_formula_for_its_scale_names():
    """TRL's `_generate_and_score_completions`: A = r − mean_g, ÷ (nanstd + 1e-4) over the group or batch."""
    from trl.trainer.utils import nanstd

    r = torch.tensor(REWARDS, dtype=torch.float64)
    mean = r.view(-1, G).mean(1).repeat_interleave(G)
    group = (r - mean) / (nanstd(r.view(-1, G), dim=1).repeat_interleave(G) + 1e-4)
    batch = (r - mean) / (nanstd(r) + 1e-4)
    # TRL's Bessel factor count / (count − 1) is a float32 tensor (1.3333333731 for 4): 2e-8 apart
    torch.testing.assert_close(policy.advantages(r, G, "group"), group, rtol=3e-8, atol=0)
    torch.testing.assert_close(policy.advantages(r, G, "batch"), batch, rtol=3e-8, atol=0)
    torch.testing.assert_close(policy.advantages(r, G, "none"), r - mean, rtol=1e-14, atol=0)


def test_dropped_groups_get_no_gradient_and_are_in_no_denominator():
    torch.manual_seed(0)
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    logps_all = (-torch.rand(12, 5, dtype=torch.float64) * 2).requires_grad_()
    old = logps_all.detach() + 0.1 * torch.randn(12, 5, dtype=torch.float64)
    mask_all = (torch.rand(12, 5) > 0.3).to(torch.float64)
    mask_all[:, 0] = 1
    keep = policy.kept_rows(rewards, G)
    adv = policy.advantages(rewards[keep], G, "minibatch")
    w = policy.sequence_weights(mask_all[keep], G, "magistral")
    loss = policy.token_loss(logps_all[keep], old[keep], adv, mask_all[keep], w, epsilon=0.2, epsilon_high=0.28).loss
    loss.backward()
    assert logps_all.grad[4:8].abs().sum() == 0
    assert logps_all.grad[keep].abs().sum() > 0
    # the same as a batch that never held the constant group
    rewards2 = torch.cat([rewards[:4], rewards[8:]])
    adv2 = policy.advantages(rewards2, G, "minibatch")
    assert adv.tolist() == adv2.tolist()
    # and unlike TRL's behaviour, where the constant group's tokens count in the dapo denominator
    w_dapo_kept = policy.sequence_weights(mask_all[keep], G, "dapo")
    assert float(w_dapo_kept[0]) == pytest.approx(1 / float(mask_all[keep].sum()))


def test_gradient_accumulation_equals_one_large_batch():
    """A tiny softmax policy; its weight's gradient summed over uneven micro-batches equals the batch's."""
    torch.manual_seed(1)
    rows, width, hidden, vocab = 8, 5, 4, 7
    head = torch.nn.Linear(hidden, vocab, bias=False).double()
    states = torch.randn(rows, width, hidden, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (rows, width))
    mask = torch.ones(rows, width, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[6, 1:] = 0

    def logps(sl):
        return torch.log_softmax(head(states[sl]), -1).gather(-1, tokens[sl, :, None]).squeeze(-1)

    with torch.no_grad():
        old = logps(slice(None)) + 0.2 * torch.randn(rows, width, dtype=torch.float64)
    adv = policy.advantages(torch.tensor([1.0, 0.0, 0.0, 0.5, 0.2, 0.9, 0.9, 0.0]), G, "minibatch")
    for loss_type in policy.LOSS_TYPES:
        w = policy.sequence_weights(mask, G, loss_type, max_completion_length=width)
        head.zero_grad()
        policy.token_loss(logps(slice(None)), old, adv, mask, w, epsilon=0.2, epsilon_high=0.28).loss.backward()
        whole = head.weight.grad.clone()
        head.zero_grad()
        for sl in (slice(0, 3), slice(3, 4), slice(4, 8)):  # cuts through a group
            policy.token_loss(logps(sl), old[sl], adv[sl], mask[sl], w[sl], epsilon=0.2, epsilon_high=0.28).loss.backward()
        torch.testing.assert_close(head.weight.grad, whole, rtol=1e-12, atol=1e-15)


def test_truncated_and_reward_stats():
    assert policy.truncated(["eos", "stop", "length", "loop"]).tolist() == [False, False, True, True]
    stats = policy.reward_stats({"math": [1.0, 0.0, None, 1.0], "none": [None]})
    assert stats == {"reward/math/mean": pytest.approx(2 / 3), "reward/math/std": pytest.approx(math.sqrt(2) / 3)}


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown scale 'std'; expected one of minibatch, group, batch, none"):
        policy.advantages(torch.zeros(4), G, "std")
    with pytest.raises(ValueError, match="unknown loss_type 'bnpo'"):
        policy.sequence_weights(torch.ones(4, 2), G, "bnpo")
    with pytest.raises(ValueError, match="beta > 0 needs the reference's log-probs"):
        policy.token_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), torch.ones(1), beta=0.1)
