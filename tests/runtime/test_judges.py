"""Judges: the LM judge is order-debiased and calibrated as documented, the reward model and a callable
answer through the same interface, and the rules (loopers lose, ties, thinking stripped) hold."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import transformers as tf

from cascadec.runtime.data import chat
from cascadec.runtime.data.tokenizer import train_bpe
from cascadec.runtime.rollout.judges import (Candidate, CallableJudge, JudgeError, LMJudge, RewardModelJudge,
                                             build_judge, preferences)

import surgery_util
import tinymodels

PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Print the squares."}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"},
     {"role": "user", "content": "And a class Stack?"}],
]
A = ["12 + 30 = 42.", "for i in range(10):\n    print(i * i)", "class Stack:\n    def push(self, x): ..."]
B = ["The quick brown fox.", "print(i)", "return a + b"]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def judge_tokenizer():
    """A byte-level BPE on which " A" and " B" after "…answer:" are single tokens, as in real vocabularies."""
    return train_bpe([tinymodels.TEXT + "Which answer is better, A or B?\nBetter answer: A\nBetter answer: B\n" * 20],
                     tinymodels.TINY["vocab"])


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = surgery_util.model(tmp_path_factory.mktemp("lm-judge"), "mistral")  # random, non-unit norm gains
    judge_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward-model") / "rm"
    config = tinymodels.hf_config("mistral", layers=2)
    config.num_labels = 1
    torch.manual_seed(3)
    tf.MistralForSequenceClassification(config).save_pretrained(path)
    judge_tokenizer().save_pretrained(path)
    return path


def full_logit_margin(judge: LMJudge, text: str) -> float:
    """ℓA − ℓB from the model's own forward pass and full logits, one unpadded prompt."""
    ids = judge.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = judge.model(input_ids=ids).logits[0, -1].double()
    return float(logits[judge.choices[0]] - logits[judge.choices[1]])


def test_lm_judge_gives_exactly_one_minus_p_when_the_answers_swap(lm_dir):
    judge = build_judge("lm", {"kind": "pairwise_model", "temperature": 1.0}, lm_dir, device="cpu")
    assert isinstance(judge, LMJudge)
    p = judge.prefer(PROMPTS, A, B)
    q = judge.prefer(PROMPTS, B, A)
    assert all(abs(x + y - 1) < 1e-12 for x, y in zip(p, q)), (p, q)
    assert all(abs(x - 0.5) > 1e-4 for x in p)  # a real, undecided-but-not-indifferent judge
    assert judge.prefer(PROMPTS[:1], A[:1], A[:1]) == [0.5]  # the same answer twice: indifferent
    # the single order is biased; the two orders together are not
    one_order = sig(full_logit_margin(judge, judge.render(PROMPTS[0], A[0], B[0])))
    other = sig(full_logit_margin(judge, judge.render(PROMPTS[0], B[0], A[0])))
    assert abs(one_order + other - 1) > 1e-3


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_lm_judge_probability_is_the_documented_formula(lm_dir, temperature):
    judge = build_judge("lm", {"kind": "pairwise_model", "temperature": temperature}, lm_dir, device="cpu")
    got = judge.prefer(PROMPTS, A, B)
    for m, a, b, p in zip(PROMPTS, A, B, got):
        d_ab = full_logit_margin(judge, judge.render(m, a, b))
        d_ba = full_logit_margin(judge, judge.render(m, b, a))
        assert p == pytest.approx(0.5 * (sig(d_ab / temperature) + sig(-d_ba / temperature)), abs=1e-6)


def test_lm_judge_renders_the_default_template_and_a_spec_template(lm_dir):
    judge = build_judge("lm", {"kind": "pairwise_model"}, lm_dir, device="cpu")
    assert judge.render(PROMPTS[1], "yes", "no") == textwrap.dedent("""\
        Below is a conversation and two candidate answers to its last message. Judge which answer is more helpful, correct and clear.

        System: Answer briefly.

        User: Print the squares.

        [Answer A]
        yes
        [End of answer A]

        [Answer B]
        no
        [End of answer B]

        Which answer is better, A or B?
        Better answer:""")
    template = "{% for m in messages %}{{ m.role }}> {{ m.content }}\n{% endfor %}1: {{ a }}\n2: {{ b }}\nBetter answer:"
    custom = build_judge("lm", {"kind": "pairwise_model", "template": template}, lm_dir, device="cpu")
    assert custom.render(PROMPTS[0], "42", "41") == "user> What is 12 + 30?\n1: 42\n2: 41\nBetter answer:"
    p, q = custom.prefer(PROMPTS, A, B), custom.prefer(PROMPTS, B, A)
    assert p != judge.prefer(PROMPTS, A, B) and all(abs(x + y - 1) < 1e-12 for x, y in zip(p, q))


def test_lm_judge_runs_both_orders_of_a_batch_of_pairs_in_one_forward(lm_dir):
    judge = build_judge("lm", {"kind": "pairwise_model", "batch_size": 8}, lm_dir, device="cpu")
    shapes = []
    judge.model.model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                                            with_kwargs=True)
    p = judge.prefer(PROMPTS, A, B)
    assert len(shapes) == 1 and shapes[0][0] == 6
    judge.batch_size = 1  # one pair (two rows) per forward: same probabilities
    shapes.clear()
    assert judge.prefer(PROMPTS, A, B) == pytest.approx(p, abs=1e-6)
    assert [s[0] for s in shapes] == [2, 2, 2]


def test_lm_judge_refuses_answers_that_are_not_single_tokens(tmp_path):
    path = surgery_util.model(tmp_path, "llama")  # tinymodels' tokenizer: " A" is "Ġ" + "A"
    with pytest.raises(JudgeError) as e:
        build_judge("big", {"kind": "pairwise_model"}, path, device="cpu")
    assert str(e.value) == ("judge 'big': the answer ' A' is not one token in the judge's tokenizer (it is "
                            "['Ġ', 'A']); the LM judge reads P from one token per answer, so it needs a "
                            "tokenizer with ' A' and ' B' as single tokens")


def test_bad_template_is_refused_at_build_time(lm_dir):
    with pytest.raises(JudgeError, match=r"^judge 'lm': the template never shows answer B \(`\{\{ b \}\}`\)$"):
        build_judge("lm", {"kind": "pairwise_model", "template": "{{ a }} Better answer:"}, lm_dir, device="cpu")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reward_model_judge_is_sigmoid_of_the_reward_difference(rm_dir, temperature):
    judge = build_judge("rm", {"kind": "pairwise_model", "temperature": temperature}, rm_dir, device="cpu")
    assert isinstance(judge, RewardModelJudge)
    got = judge.prefer(PROMPTS, A, B)

    def reward(messages, answer):  # one unpadded sequence, the model's own forward
        ids = chat.encode(judge.tokenizer, [*messages, {"role": "assistant", "content": answer}]).ids
        with torch.no_grad():
            return float(judge.model(input_ids=torch.tensor([ids])).logits[0, 0])

    for m, a, b, p in zip(PROMPTS, A, B, got):
        assert p == pytest.approx(sig((reward(m, a) - reward(m, b)) / temperature), abs=1e-6)
    assert all(abs(x + y - 1) < 1e-12 for x, y in zip(got, judge.prefer(PROMPTS, B, A)))
    assert len({round(p, 6) for p in got}) == 3


def test_reward_model_with_several_labels_is_refused(tmp_path):
    config = tinymodels.hf_config("mistral", layers=1)
    config.num_labels = 2
    tf.MistralForSequenceClassification(config).save_pretrained(tmp_path / "rm2")
    judge_tokenizer().save_pretrained(tmp_path / "rm2")
    with pytest.raises(JudgeError, match=r"^judge 'rm': the reward model has 2 labels; a reward model scores with "
                                         r"one \(num_labels 1\)$"):
        build_judge("rm", {"kind": "pairwise_model"}, tmp_path / "rm2", device="cpu")


# ---------------------------------------------------------------------------------------------
# Callable judges and the rules


JUDGE_MODULE = '''
SEEN = []

def longer(prompts, a, b, **columns):
    SEEN.append({"prompts": prompts, "a": a, "b": b, **columns})
    return [0.8 if len(x) > len(y) else 0.2 for x, y in zip(a, b)]

def by_answer(prompts, a, b, answer):
    return [1.0 if x == t else 0.0 if y == t else 0.5 for x, y, t in zip(a, b, answer)]

def garbage(prompts, a, b):
    return RESULT

RESULT = None
NOT_A_FUNCTION = 3
'''


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "myjudges.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import myjudges

    importlib.reload(myjudges)
    yield myjudges


def test_callable_judge_through_the_same_interface_with_columns_and_temperature(judge_module):
    judge = build_judge("rule", {"kind": "callable", "function": "myjudges:by_answer"}, None)
    assert isinstance(judge, CallableJudge)
    cols = [{"answer": "42"}, {"answer": "x"}, {"answer": "print(i)"}]
    assert judge.prefer(PROMPTS, ["42", "a", "b"], ["41", "c", "print(i)"], cols) == [1.0, 0.5, 0.0]
    warm = build_judge("rule", {"kind": "callable", "function": "myjudges:longer", "temperature": 2.0}, None)
    got = warm.prefer(PROMPTS, A, B, [{"answer": "42", "id": i} for i in range(3)])
    logit = math.log(0.8 / 0.2)
    assert got == pytest.approx([sig(-logit / 2), sig(logit / 2), sig(logit / 2)], abs=1e-15)  # A[0] is shorter
    assert judge_module.SEEN[-1]["answer"] == ["42", "42", "42"] and judge_module.SEEN[-1]["id"] == [0, 1, 2]


def test_rules_loopers_and_unterminated_samples_lose_two_bad_ones_tie(judge_module):
    judge = build_judge("rule", {"kind": "callable", "function": "myjudges:longer"}, None)
    clean, longer_clean = Candidate("ok"), Candidate("a longer answer")
    looped_eos = Candidate("la la la la la la la la la la", finish="eos", looped=True)
    cut, loop = Candidate("never ends", finish="length"), Candidate("again again", finish="loop", looped=True)
    a = [clean, looped_eos, cut, loop, longer_clean, Candidate("s", finish="stop")]
    b = [cut, clean, loop, looped_eos, clean, Candidate("st", finish="stop")]
    prompts = [PROMPTS[i % 3] for i in range(6)]
    got = preferences(judge, prompts, a, b, columns=[{"k": i} for i in range(6)])
    assert got == [1.0, 0.0, 0.5, 0.5, 0.8, 0.2]
    # the judge was asked once, about the two clean pairs only, with their columns
    assert judge_module.SEEN == [{"prompts": [prompts[4], prompts[5]], "a": ["a longer answer", "s"],
                                  "b": ["ok", "st"], "k": [4, 5]}]


def test_thinking_is_stripped_before_judging_and_unclosed_thinking_loses(judge_module):
    judge = build_judge("rule", {"kind": "callable", "function": "myjudges:longer"}, None)
    a = [Candidate("<think>a very long chain of thought, longer than any answer</think>\n\nShort."),
         Candidate("<think>one</think>A <think>two</think>clear answer"),
         Candidate("<think>still thinking when the budget ran out")]
    b = [Candidate("A longer final answer."), Candidate("B"), Candidate("plain")]
    got = preferences(judge, PROMPTS, a, b, strip_thinking=True)
    assert got == [0.2, 0.8, 0.0]
    assert judge_module.SEEN == [{"prompts": PROMPTS[:2], "a": ["Short.", "A clear answer"],
                                  "b": ["A longer final answer.", "B"]}]
    judge_module.SEEN.clear()
    assert preferences(judge, PROMPTS[:1], a[:1], b[:1]) == [0.8]  # not stripped: the thinking counts
    assert judge_module.SEEN[0]["a"] == [a[0].text]


@pytest.mark.parametrize("result, message", [
    ([0.5, 1.5, 0.2], "returned 1.5 for pair 1"),
    ([0.5, 0.5], "returned 2 values for 3 pairs"),
    ([0.1, "0.9", 0.2], "returned '0.9' for pair 1"),
    ([0.1, float("nan"), 0.2], "returned nan for pair 1"),
    ([True, 0.1, 0.2], "returned True for pair 0"),
    (None, "returned a NoneType, not a list"),
    (0.5, "returned a float, not a list"),
])
def test_a_callable_that_returns_garbage_is_a_clear_error(judge_module, result, message):
    judge_module.RESULT = result
    judge = build_judge("mine", {"kind": "callable", "function": "myjudges:garbage"}, None)
    with pytest.raises(JudgeError) as e:
        judge.prefer(PROMPTS, A, B)
    assert str(e.value) == f"judge 'mine': function 'myjudges:garbage' {message}; it must return one P(a ≻ b) in [0, 1] per pair"


@pytest.mark.parametrize("function, message", [
    ("nomodule_here:f", "judge 'mine': cannot import module 'nomodule_here' of function 'nomodule_here:f': "
                        "No module named 'nomodule_here'"),
    ("myjudges:missing", "judge 'mine': module 'myjudges' has no function 'missing'"),
    ("myjudges:NOT_A_FUNCTION", "judge 'mine': 'myjudges:NOT_A_FUNCTION' is not a function but a int"),
    ("myjudges.longer", "judge 'mine' of kind callable needs `function: \"module:function\"`, got 'myjudges.longer'"),
    (None, "judge 'mine' of kind callable needs `function: \"module:function\"`, got None"),
])
def test_a_callable_that_cannot_be_loaded_is_a_clear_error(judge_module, function, message):
    with pytest.raises(JudgeError) as e:
        build_judge("mine", {"kind": "callable", "function": function}, None)
    assert str(e.value) == message


def test_a_reward_kind_is_not_a_pairwise_judge():
    with pytest.raises(JudgeError) as e:
        build_judge("math", {"kind": "math_answer"}, None)
    assert str(e.value) == ("judge 'math' is of kind 'math_answer', a reward (grpo), not a pairwise judge; "
                            "odpo needs a judge of kind pairwise_model, callable or compare_rewards")
