"""The rubric reward (`rubric_model`): on a judge whose verdict is planted (it answers Yes exactly when
a marker token is in its prompt), the reward is the exact fraction of items met, hard and soft equal
a float64 computation from the model's own logits, batching changes nothing, thinking is not
judged, and a grpo stage runs with it through the executor."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cascadec import judging, rewarding
from cascadec.runtime import executor
from cascadec.runtime.data.tokenizer import train_bpe
from cascadec.runtime.rollout import rewards
from cascadec.runtime.rollout.generate import Completion
from cascadec.runtime.rollout.judges import JudgeError, build_judge
from cascadec.runtime.rollout.rubric import RubricReward, build

import tinymodels

MARKER = "@"  # the judge says Yes exactly when this character is somewhere in its prompt
QUESTION = [{"role": "user", "content": "Explain tides."}]
ITEMS = ["Names the @Moon.", "Says there are two a day.", "Uses an @ sign."]  # 2 of 3 carry the marker


def config(**options) -> dict:
    return rewarding.resolve("rubric_model", options, None)[0]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    """A 1-layer Mistral whose P(" Yes") > P(" No") exactly when the marker is in the prompt.

    Every token embeds 1 on channel 0 and the marker also 4 on channel 1. The queries are zero, so
    attention averages over the context; one value row reads channel 1, one output column writes
    it back to channel 1 of the residual (×50), nothing else writes channels 0 and 1, so at the
    last position channel 1 is ∝ (markers in the prompt) / (its length), channel 0 is 1. The
    " Yes" and " No" rows read channels 0 and 1 only: the margin's sign is the marker's presence
    whatever the random rest of the model does, and its size varies from prompt to prompt (the
    final norm), so P(yes) is neither 0 nor 1. Norm gains are non-unit and negative on channel 1;
    weights are saved in bf16, as real judges are."""
    path = tinymodels.save_model(tmp_path_factory.mktemp("rubric") / "judge", "mistral", seed=5, layers=1)
    tok = train_bpe([tinymodels.TEXT + "Does the response meet the criterion? Answer Yes or No.\n"
                     "Answer: Yes\nAnswer: No\n" * 20], tinymodels.TINY["vocab"])
    tok.save_pretrained(path)
    yes, no = (tok("Answer:" + a, add_special_tokens=False)["input_ids"][-1] for a in (" Yes", " No"))
    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    assert len(marker) == 1
    w = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0."
    emb = w["model.embed_tokens.weight"]
    emb.copy_(0.3 * torch.randn(emb.shape, generator=g))
    emb[:, 0], emb[:, 1] = 1.0, 0.0
    emb[marker[0], 1] = 4.0
    w[p + "input_layernorm.weight"].copy_(1 + 0.8 * torch.randn(64, generator=g))
    w[p + "input_layernorm.weight"][1] = -1.5
    w[p + "self_attn.q_proj.weight"].zero_()
    w[p + "self_attn.v_proj.weight"][0] = 0.0
    w[p + "self_attn.v_proj.weight"][0, 1] = 1.0
    w[p + "self_attn.o_proj.weight"][:2] = 0.0
    w[p + "self_attn.o_proj.weight"][1, 0] = 50.0
    w[p + "mlp.down_proj.weight"][:2] = 0.0
    w["model.norm.weight"].copy_(1 + 0.8 * torch.randn(64, generator=g))
    w["model.norm.weight"][:2] = torch.tensor([0.7, -1.2])
    head = w["lm_head.weight"]
    head[[yes, no]] = 0.0
    head[yes, :2] = torch.tensor([-0.4, 0.3])
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def judge(judge_dir) -> RubricReward:
    return build("rubric", config(), judge_dir, device="cpu")


@functools.cache
def float64_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


def p_yes_float64(reward: RubricReward, text: str) -> float:
    """P(yes) from the model's own full logits in float64, one unpadded prompt."""
    model = float64_model(reward.model.config._name_or_path)
    ids = reward.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    pair = logits[reward.choices]
    return float(torch.softmax(pair, -1)[0])


def completion(text: str, finish: str = "eos", looped: bool = False) -> Completion:
    return Completion(ids=[5] * len(text), text=text, finish=finish, looped=looped, logprobs=[0.0] * len(text))


def test_the_reward_is_the_exact_fraction_of_items_met(judge):
    texts = ["The Moon pulls the sea.", "The @ Moon pulls the sea.", "<think>@ @ @</think>The Moon pulls the sea.",
             "@ opened by the template</think>The Moon pulls the sea."]
    got = judge([QUESTION] * 5, [*texts, "No rubric here."], rubric=[ITEMS] * 4 + [None])
    assert got == [2 / 3, 1.0, 2 / 3, 2 / 3, None]  # the marker in the response meets every item; thinking is not judged
    assert judge([QUESTION], ["plain"], rubric=[["Is short."]]) == [0.0]


def test_hard_and_soft_equal_a_float64_computation_from_the_full_logits(judge_dir, judge):
    soft = build("rubric", config(mode="soft", temperature=1.0), judge_dir, device="cpu")
    responses = ["The Moon pulls the sea.", "Gravity, twice daily, @ noon."]
    rubrics = [ITEMS, ["Is short.", "Mentions @ gravity."]]
    expected_hard, expected_soft = [], []
    for response, items in zip(responses, rubrics):
        p = [p_yes_float64(judge, judge.render(QUESTION, response, item)) for item in items]
        assert all(0.02 < q < 0.98 for q in p), p  # a soft judge, not a saturated one
        expected_hard.append(sum(q > 0.5 for q in p) / len(p))
        expected_soft.append(sum(p) / len(p))
    assert judge([QUESTION] * 2, responses, rubric=rubrics) == expected_hard == [2 / 3, 1.0]
    assert soft([QUESTION] * 2, responses, rubric=rubrics) == pytest.approx(expected_soft, abs=1e-6)
    hot = build("rubric", config(mode="soft", temperature=2.0), judge_dir, device="cpu")
    margins = [math.log(q / (1 - q)) for q in (p_yes_float64(judge, judge.render(QUESTION, responses[0], i))
                                                 for i in ITEMS)]
    assert hot([QUESTION], responses[:1], rubric=rubrics[:1])[0] == pytest.approx(
        sum(1 / (1 + math.exp(-m / 2)) for m in margins) / 3, abs=1e-6)
    assert build("rubric", config(temperature=2.0), judge_dir, device="cpu")(
        [QUESTION] * 2, responses, rubric=rubrics) == expected_hard  # T changes no verdict


def test_batch_size_changes_nothing_and_every_item_is_batched(judge_dir):
    prompts = [QUESTION, [{"role": "system", "content": "Be brief."}, *QUESTION], QUESTION]
    responses = ["The Moon.", "Twice a day, because the Moon and the Sun pull on the oceans.", "@"]
    rubrics = [ITEMS, ["Is short."], ITEMS[:2]]
    one = build("rubric", config(mode="soft", batch_size=1), judge_dir, device="cpu")
    many = build("rubric", config(mode="soft", batch_size=64), judge_dir, device="cpu")
    rows = []
    many.model.model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    assert many(prompts, responses, rubric=rubrics) == pytest.approx(one(prompts, responses, rubric=rubrics), abs=1e-6)
    assert rows == [6]  # 3 + 1 + 2 items, one padded forward
    many.batch_size, rows[:] = 4, []
    many(prompts, responses, rubric=rubrics)
    assert rows == [4, 2]


def test_loopers_and_unterminated_completions_meet_nothing_without_asking_the_judge(judge):
    asked = []
    hook = judge.model.model.register_forward_hook(lambda m, a, kw, out: asked.append(kw["input_ids"].shape[0]),
                                                   with_kwargs=True)
    samples = [completion("@ fine"), completion("@ @ @ @", finish="loop", looped=True),
               completion("@ and then", finish="length"), completion("<think>@ never closed"),
               completion("@ repeats @ repeats", looped=True)]
    got = rewards.score({"rubric": (judge, 1.0)}, [QUESTION] * 5, samples, {"rubric": [ITEMS] * 5}, workers=0)
    hook.remove()
    assert got == {"rubric": [1.0, 0.0, 0.0, 0.0, 0.0]} and asked == [3]


class Unpicklable:
    """An in-process reward that cannot go to a worker (a lambda attribute does not pickle)."""

    in_process = True

    def __init__(self):
        self.f = lambda c: float(len(c))

    def __call__(self, prompts, completions, **columns):
        return [self.f(c) for c in completions]


def test_in_process_rewards_run_here_while_the_workers_run_the_others():
    scorers = {"here": (Unpicklable(), 1.0), "length": (rewards.LengthPenalty(max_tokens=4, cache_tokens=2), 0.1)}
    samples = [completion("abc"), completion("abcdef", finish="length")]
    columns = {"rubric": [None, None]}
    got = rewards.score(scorers, [QUESTION] * 2, samples, columns, workers=1)
    assert got == rewards.score(scorers, [QUESTION] * 2, samples, columns, workers=0) == {
        "here": [3.0, 6.0], "length": [-0.5, -1.0]}


def test_a_judge_that_cannot_answer_in_one_token_or_has_no_checkpoint_is_refused(judge_dir, tmp_path):
    with pytest.raises(JudgeError) as e:
        build("rubric", config(answers=[" Yes", " Nope"]), judge_dir, device="cpu")
    assert str(e.value) == ("judge 'rubric': the answer ' Nope' is not one token in the judge's tokenizer (it is "
                            "['ĠNo', 'p', 'e']); the LM judge reads P from one token per answer, so it needs a "
                            "tokenizer with ' Yes' and ' Nope' as single tokens; or set the judge's `answers` to two "
                            "words that are, after `Answer:`")
    with pytest.raises(JudgeError, match=r"^judge 'rubric' of kind rubric_model has no model checkpoint \(the stage "
                                         r"has no `judge:rubric` input; plan it again with `cascadec plan`\)$"):
        rewards.build_rewards({"rubric": config()}, {})
    with pytest.raises(JudgeError, match=r"^judge 'rubric': the template never shows the criterion "
                                         r"\(`\{\{ criterion \}\}`\)$"):
        build("rubric", config(template="{{ response }} Answer:"), judge_dir, device="cpu")


def test_a_compare_rewards_judge_totals_the_rubric_reward_for_odpo(judge_dir):
    """odpo's rule-based pairwise judge over the rubric reward: the judge checkpoint comes from the
    stage's `judge:<name>` input; a response meeting 3 of 3 items against one meeting 2 of 3 gives
    P = σ((1 − 2/3)/0.1), and a pair without a rubric ties."""
    cmp = {"kind": "compare_rewards", "rewards": ["rub"], "temperature": 0.1}
    judge = build_judge("cmp", cmp, None, device="cpu", judges={"cmp": cmp, "rub": config()},
                        inputs={"judge:rub": judge_dir})
    got = judge.prefer([QUESTION] * 3, ["The @ Moon.", "The Moon.", "The @ Moon."], ["The Moon."] * 3,
                       [{"rubric": ITEMS}, {"rubric": ITEMS}, {"rubric": None}])
    assert got == pytest.approx([1 / (1 + math.exp(-(1 - 2 / 3) / 0.1)), 0.5, 0.5], abs=1e-12)
    assert judge.take() == {"rub": [1.0, 2 / 3, None, 2 / 3, 2 / 3, None]}


def test_the_default_template_renders_the_conversation_response_and_criterion(judge):
    text = judge.render([{"role": "system", "content": "Be brief."}, *QUESTION], "The Moon.", "Names the Moon.")
    assert text == judging.RUBRIC_TEMPLATE.replace("{{ conversation }}", "System: Be brief.\n\nUser: Explain tides.") \
        .replace("{{ response }}", "The Moon.").replace("{{ criterion }}", "Names the Moon.")
    assert text.endswith("\n\nDoes the response meet the criterion? Answer Yes or No.\nAnswer:")


# ---------------------------------------------------------------------------------------------
# The grpo stage with a rubric reward, through the executor


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny policy that ends its answers and often writes the marker (as test_grpo's: a constant
    embedding channel, which the head turns into an EOS logit of about +3 and a marker logit of
    about +2.5 at every position), so a group's samples meet different shares of a rubric."""
    path = tinymodels.save_model(tmp_path_factory.mktemp("rubric-policy") / "policy", "mistral", seed=2, layers=2,
                                 hidden=32, ffn=64, heads=2, kv_heads=1)
    marker = tinymodels.tokenizer()(MARKER, add_special_tokens=False)["input_ids"]
    assert len(marker) == 1
    w = load_file(str(path / "model.safetensors"))
    w["model.embed_tokens.weight"][:, 0] = 1.0
    w["lm_head.weight"][2, 0] = 3.0 / 32 ** 0.5  # token 2 is the tokenizer's EOS
    w["lm_head.weight"][marker[0], 0] = 2.5 / 32 ** 0.5
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.slow
def test_a_grpo_stage_runs_with_the_rubric_reward_and_logs_it(policy, judge_dir, tmp_path):
    (tmp_path / "prompts").mkdir()
    with (tmp_path / "prompts" / "p.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"say {i}", "rubric": ITEMS[:1 + i % 3] if i % 4 else "Is @ polite."}) + "\n")
    judges = {"rubric": config(batch_size=8),
              "length": rewarding.resolve("length", {"weight": 0.1}, 8)[0]}
    st = {"id": "grpo/tiny/general/grpo", "kind": "grpo", "hash": "test", "needs": [],
          "outputs": ["stages/grpo/tiny/general/grpo/model"], "launch": {"devices": 1, "launcher": "local"},
          "inputs": [{"role": "policy", "model": "policy"}, {"role": "data", "data": "prompts"},
                     {"role": "judge:rubric", "model": "judge"}],
          "config": {"seq_len": 32, "global_batch": 2, "micro_batch": 2, "steps": 2, "beta": 0.0, "prompts": 4,
                     "data": {"name": "prompts", "offset": 0, "shuffle": True},
                     "generation": {"samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8},
                     "judges": copy.deepcopy(judges), "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "magistral",
                     "scale_rewards": "minibatch", "mask_truncated_completions": False,
                     "drop_constant_groups": False, "refill_rounds": 0, "num_iterations": 1, "reward_workers": 1,
                     "optimizer": {"name": "adamw", "lr": 1e-3, "min_lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                   "weight_decay": 0.0, "grad_clip": 1.0},
                     "schedule": {"kind": "constant", "warmup_steps": 0},
                     "checkpoint": {"every_steps": 1, "keep": 1}, "seed": 0, "precision": "fp32",
                     "activation_checkpointing": False}}
    plan = {"spec_sha256": "0" * 64,
            "models": {"policy": {"source": {"path": str(policy)}}, "judge": {"source": {"path": str(judge_dir)}}},
            "data": {"prompts": {"kind": "jsonl", "paths": [str(tmp_path / "prompts" / "*.jsonl")], "format": "prompts"}},
            "stages": [st]}
    lines = []
    assert executor.run_plan(plan, tmp_path / "work", tmp_path, out=lines.append) == 0, "\n".join(lines)
    out = tmp_path / "work" / "stages" / st["id"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["reward/rubric/mean"] <= 1.0 and r["reward/rubric/std"] >= 0.0
        assert r["groups"] == 2 and math.isfinite(r["loss"])
    assert any(r["reward/rubric/std"] > 0 for r in records)  # the judge told samples apart
    assert json.loads((out / "manifest.json").read_text())["metrics"]["rewards"] == ["length", "rubric"]
    AutoModelForCausalLM.from_pretrained(out / "model")
