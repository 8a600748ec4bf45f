"""The generation engine: greedy equals `model.generate`, sampled frequencies match the model's
distribution, finish reasons, the loop detector, determinism, log-probs."""

from __future__ import annotations

import random

import pytest
import torch
import transformers as tf

import tinymodels
from cascadec.runtime.rollout import loops
from cascadec.runtime.rollout.generate import Sampling, choose, engine

TOK = tinymodels.tokenizer()
EOS, PAD = 2, 0


def _model(family: str = "mistral", *, tied: bool = False, seed: int = 0, sharpen: float = 1.0):
    """A tiny random decoder with norm gains like a trained model's (spread around 1, some
    negative); ``sharpen`` scales the final norm so the next-token distribution is peaked."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tinymodels.hf_config(family, tied=tied)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.8 * torch.randn(p.shape, generator=g))
        model.model.norm.weight.mul_(sharpen)
    return model


def _prompts(lengths=(3, 11, 6, 1, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 320, (n,), generator=g).tolist() for n in lengths]


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# --- greedy = model.generate ----------------------------------------------------------------

@pytest.mark.parametrize("family,tied", [("mistral", False), ("mistral", True), ("ministral3", False), ("llama", False)])
def test_greedy_equals_hf_generate_on_a_padded_batch(family, tied):
    model, prompts = _model(family, tied=tied), _prompts((3, 11, 6, 1, 50))  # 50 + 24 > 64: the cache grows
    out = engine(model, TOK).generate(prompts, Sampling(temperature=0, max_new_tokens=24, stop_on_loop=False),
                                      seed=0)
    ids, mask = _left_padded(prompts)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=PAD)
    ref = ref[:, ids.shape[1]:].tolist()
    for c, r in zip(out, ref):
        if c.finish == "eos":
            assert c.ids == r[:len(c.ids)] and c.ids[-1] == EOS
        else:
            assert (c.finish, c.ids) == ("length", r)


# --- sampled frequencies = the model's distribution ----------------------------------------------

def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``; categories expected < 5 times are pooled.
    p-value = Q(df/2, χ²/2), the regularised upper incomplete gamma function (the chi-square
    survival function), from torch.special (scipy is not a dependency)."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2))


def _truncated(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus distribution, by the plain definition: sort, keep while the mass before < top_p."""
    values, index = probs.sort(descending=True)
    keep = (values.cumsum(0) - values) < top_p
    out = torch.zeros_like(probs)
    out[index[keep]] = values[keep]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p,sharpen", [(1.0, 1.0, 1.0), (0.7, 0.9, 1.0), (0.7, 0.9, 8.0)])
def test_first_token_frequencies_match_the_model(temperature, top_p, sharpen):
    """6000 first tokens (one key each) against softmax(logits / T) truncated to the nucleus.
    Unsharpened, the distribution is nearly flat, so the nucleus holds 270 tokens (the full-sort
    path); sharpened it holds 35 (the top-64 path). The seed is fixed, so the test is
    deterministic; its threshold p > 1e-3 would reject a correct sampler once in a thousand seeds."""
    model, prompt = _model(sharpen=sharpen), _prompts((5,))[0]
    n = 6000
    out = engine(model, TOK, batch_size=n).generate(
        [prompt] * n, Sampling(temperature=temperature, top_p=top_p, max_new_tokens=1), seed=7)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    probs = _truncated(torch.softmax(logits / temperature, -1), top_p)
    counts = torch.bincount(torch.tensor([c.ids[0] for c in out]), minlength=probs.numel())
    assert counts[probs == 0].sum() == 0  # never outside the nucleus
    if top_p < 1:
        assert 10 < int((probs > 0).sum()) < probs.numel()  # the nucleus really truncates
    assert _chi_square_p(counts, probs) > 1e-3


def test_chi_square_rejects_the_wrong_temperature():
    """The frequency test has power: samples at T = 1 fail against the T = 0.7 distribution."""
    model, prompt = _model(sharpen=3.0), _prompts((5,))[0]
    out = engine(model, TOK, batch_size=6000).generate([prompt] * 6000, Sampling(max_new_tokens=1), seed=7)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    counts = torch.bincount(torch.tensor([c.ids[0] for c in out]), minlength=logits.numel())
    assert _chi_square_p(counts, torch.softmax(logits, -1)) > 1e-3
    assert _chi_square_p(counts, torch.softmax(logits / 0.7, -1)) < 1e-6


def test_nucleus_keeps_at_least_one_token_and_falls_back_to_a_full_sort():
    """Vocab 100, beyond the top-64 window: a peaked row (one token holds more than top_p) and a
    nearly flat row whose nucleus at top_p = 0.9 holds ~90 tokens (found by the full sort)."""
    peaked = torch.cat([torch.tensor([9.0]), torch.zeros(99)])
    flat = -0.01 * torch.arange(100.0)  # strictly decreasing: sorted order = token order
    for u in (0.0, 0.5, 0.999):
        pick, _ = choose(torch.stack([peaked, flat]), Sampling(temperature=1.0, top_p=0.005), torch.tensor([u, u]))
        assert pick.tolist() == [0, 0]  # the nucleus is the single most likely token
    pick, _ = choose(flat[None], Sampling(temperature=1.0, top_p=0.9), torch.tensor([0.999]))
    p = torch.softmax(flat.double(), -1)
    size = int(((p.cumsum(0) - p) < 0.9).sum())
    assert 64 < size and int(pick) == size - 1  # the last token of the nucleus, beyond the top-64 window


# --- planted model: finish reasons, loops, stop strings -------------------------------------------

DEF, SELF, DOT, ITEMS, A, DD = 271, 285, 17, 291, 282, 305  # 'def', ' self', '.', 'items', ' a', 'dd'


def _planted():
    """A decoder whose next token is a fixed function of the current one: attention and MLP
    outputs are zero, so the last hidden state is the token's embedding, which the head maps
    to its successor: def → self → . → items → def (a cycle of 4), and a → dd → EOS."""
    model = _model("mistral")
    successor = {DEF: SELF, SELF: DOT, DOT: ITEMS, ITEMS: DEF, A: DD, DD: EOS}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        for i, (tok, nxt) in enumerate(successor.items()):
            model.model.embed_tokens.weight[tok] = 0
            model.model.embed_tokens.weight[tok, i] = 1.0
            model.lm_head.weight[nxt, i] = 6.0  # logit 6 · √64 = 48 over ~0.1 for the rest
    return model


def test_finish_reasons_eos_length_loop_and_stop():
    model = _planted()
    eng = engine(model, TOK)
    # the EOS row leaves the batch at step 2; the two looping rows go on (loop state compacted)
    eos, loop, loop2 = eng.generate([[5, A], [5, DEF], [DOT]], Sampling(max_new_tokens=100), seed=0)
    assert (eos.finish, eos.ids, eos.text, eos.looped) == ("eos", [DD, EOS], "dd", False)
    # period 4: the run reaches the 32-token minimum span at the 32nd token
    assert (loop.finish, loop.looped, loop.ids) == ("loop", True, [SELF, DOT, ITEMS, DEF] * 8)
    assert (loop2.finish, loop2.ids) == ("loop", [ITEMS, DEF, SELF, DOT] * 8)
    [length] = eng.generate([[5, DEF]], Sampling(max_new_tokens=10), seed=0)
    assert (length.finish, length.ids, length.looped) == ("length", [SELF, DOT, ITEMS, DEF] * 2 + [SELF, DOT], False)
    [kept] = eng.generate([[5, DEF]], Sampling(max_new_tokens=40, stop_on_loop=False), seed=0)
    assert (kept.finish, kept.looped, len(kept.ids)) == ("length", True, 40)


def test_stop_string_cut_right_after_its_last_token():
    model = _planted()
    [c] = engine(model, TOK).generate([[DEF]], Sampling(max_new_tokens=50, stop=("sdef",)), seed=0)
    # " self.itemsdef": the stop string ends inside the second 'def'
    assert (c.finish, c.ids) == ("stop", [SELF, DOT, ITEMS, DEF])
    assert c.text == " self.itemsdef" and "sdef" not in TOK.decode(c.ids[:-1])
    [c] = engine(model, TOK).generate([[DEF]], Sampling(max_new_tokens=50, stop=("f s", "zz")), seed=0)
    assert (c.finish, c.ids) == ("stop", [SELF, DOT, ITEMS, DEF, SELF])  # spans two tokens


def test_looping_flags_a_planted_loop_only_at_the_tail():
    prose = TOK(tinymodels.TEXT[:400], add_special_tokens=False)["input_ids"]
    cycle = [40, 41, 42, 43, 44, 45, 46]
    assert loops.looping(prose + cycle * 5)  # 35 tokens, 5 copies
    assert not loops.looping(prose + cycle * 4)  # 28 tokens < the 32-token span
    assert not loops.looping(prose + cycle * 5 + prose[:20])  # recovered: the tail is prose
    assert loops.looping(prose + [7] * 32) and not loops.looping(prose + [7] * 31)
    assert not loops.looping(cycle * 3, min_span=1)  # 3 copies < min_repeats
    very = TOK("it was very very very very good, and so so so so nice", add_special_tokens=False)["input_ids"]
    assert not loops.looping(prose + very)
    # TEXT is 4 copies of a 134-token text: a period beyond max_period (64) is not a loop
    assert not loops.looping(TOK(tinymodels.TEXT, add_special_tokens=False)["input_ids"])


def test_tracker_agrees_with_looping():
    rng = random.Random(0)
    for _ in range(60):
        ids = [rng.randrange(8) for _ in range(rng.randrange(0, 20))]
        unit = [rng.randrange(8) for _ in range(rng.randrange(1, 9))]
        ids += unit * rng.randrange(0, 9) + [rng.randrange(8) for _ in range(rng.randrange(0, 3))]
        tracker = loops.Tracker(1, min_span=12, max_period=8)
        for t in range(len(ids)):
            fired = bool(tracker.push(torch.tensor([ids[t]]))[0])
            assert fired == loops.looping(ids[:t + 1], min_span=12, max_period=8)


# --- determinism and log-probs ----------------------------------------------------------------------

def test_samples_depend_only_on_seed_and_key():
    """Batch size 1, 3 and 32 and a permuted prompt list give the same samples (float32). A
    differently shaped batch may round a logit differently in the last ulp; a sample changes
    only if a uniform falls within ~1e-7 of a CDF boundary, so exact ids are expected here and
    log-probs are compared at 1e-5."""
    model = _model()
    prompts = _prompts((3, 11, 6, 1, 8, 4, 9))
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=20)
    ref = engine(model, TOK, batch_size=32).generate(prompts, sampling, seed=3)
    for batch_size in (1, 3):
        assert [c.ids for c in engine(model, TOK, batch_size=batch_size).generate(prompts, sampling, seed=3)] == \
            [c.ids for c in ref]
    perm = [4, 0, 6, 2, 1, 5, 3]
    out = engine(model, TOK, batch_size=3).generate([prompts[i] for i in perm], sampling, seed=3, keys=perm)
    for c, i in zip(out, perm):
        assert c.ids == ref[i].ids and c.finish == ref[i].finish
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref[i].logprobs), atol=1e-5, rtol=0)
    again = engine(model, TOK).generate(prompts, sampling, seed=3)
    assert [c.ids for c in again] == [c.ids for c in ref]
    other_key = engine(model, TOK).generate(prompts[:1], sampling, seed=3, keys=[99])
    other_seed = engine(model, TOK).generate(prompts[:1], sampling, seed=4)
    assert other_key[0].ids != ref[0].ids and other_seed[0].ids != ref[0].ids
    same = engine(model, TOK).generate([prompts[0]] * 2, sampling, seed=3)  # repeated prompt, keys 0 and 1
    assert same[0].ids == ref[0].ids and same[1].ids != same[0].ids


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others():
    """Stop strings end rows at different steps; the batch is compacted each time, and every
    row still equals its run alone."""
    model, prompts = _model(), _prompts((3, 11, 6, 1, 8, 4, 9, 2))
    sampling = Sampling(temperature=1.0, max_new_tokens=30, stop=("e",))
    batch = engine(model, TOK, batch_size=8).generate(prompts, sampling, seed=5)
    alone = engine(model, TOK, batch_size=1).generate(prompts, sampling, seed=5)
    assert [(c.ids, c.finish) for c in batch] == [(c.ids, c.finish) for c in alone]
    lengths = sorted(len(c.ids) for c in batch if c.finish == "stop")
    assert len(lengths) >= 4 and lengths[0] < lengths[-1]
    assert all(("e" in c.text) == (c.finish == "stop") for c in batch)


@pytest.mark.parametrize("tied", [False, True])
def test_logprobs_are_the_models_untempered_log_softmax(tied):
    model = _model(tied=tied)
    prompts = _prompts((4, 9))
    out = engine(model, TOK).generate(prompts, Sampling(temperature=0.7, top_p=0.9, max_new_tokens=16), seed=1)
    for p, c in zip(prompts, out):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c.ids])).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
        assert len(c.logprobs) == len(c.ids) and c.text == TOK.decode(c.ids, skip_special_tokens=True)


def test_training_mode_restored_and_stats_counted():
    model = _model()
    model.train()
    eng = engine(model, TOK)
    out = eng.generate(_prompts((3, 5)), Sampling(max_new_tokens=6, stop_on_loop=False), seed=0)
    assert model.training
    assert eng.last.prompts == 2 and eng.last.tokens == sum(len(c.ids) for c in out) and eng.last.tokens_per_s > 0
    eng.generate(_prompts((3,)), Sampling(max_new_tokens=6), seed=0)
    assert eng.total.prompts == 3 and eng.total.tokens == eng.last.tokens + sum(len(c.ids) for c in out)


@pytest.mark.parametrize("sampling,keys,prompts,message", [
    (Sampling(temperature=-1), None, [[5]], "sampling temperature must be ≥ 0 (0 = greedy), got -1"),
    (Sampling(top_p=0), None, [[5]], "sampling top_p must be in (0, 1], got 0"),
    (Sampling(max_new_tokens=0), None, [[5]], "sampling max_new_tokens must be at least 1, got 0"),
    (Sampling(), [1], [[5], [6]], "1 keys for 2 prompts: give one key per prompt"),
    (Sampling(), None, [[5], []], "prompt 1 is empty: a prompt needs at least one token"),
])
def test_bad_arguments_are_refused_with_a_clear_message(sampling, keys, prompts, message):
    with pytest.raises(ValueError) as err:
        engine(_model(), TOK).generate(prompts, sampling, seed=0, keys=keys)
    assert str(err.value).startswith(message)
