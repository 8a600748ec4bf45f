"""The `rubric_model` GRPO reward: an LM judge asked, per rubric item, whether a response meets it.

Owns the rubric reward (Ministral 3's general-prompt GRPO: "graded by an LLM judge against atomic
rubrics, reward = fraction of rubric items met"). Built from judges.py's LM-judge pieces (loading,
answer tokens, head-row margins, padded batches, thinking stripped); it must not generate or train.

For completion c of a prompt with rubric items r_1 … r_n, the judge reads the template (the
conversation; c with its `<think>…</think>` removed, and what precedes a lone `</think>` too;
one item) and, at its next token, P_k(yes) = σ((ℓ_yes − ℓ_no)/T): the two answer tokens'
probabilities renormalised over the pair (the rest of the vocabulary is ignored). The reward is

    hard (default):  #{k : P_k(yes) > ½} / n      (the fraction of items met; T cannot change it)
    soft:            Σ_k P_k(yes) / n

None where the record has no rubric (not applicable); 0, without asking the judge, for a completion
that looped, never terminated or never closes its thinking: the pairwise judges' rule (such a
sample loses, judges.preferences), since degenerate text meets no criterion. Every item of every
completion of a call goes through the judge in padded batches of `batch_size` prompts, without
gradients: items × completions forwards per GRPO step.

The reward holds a model, so it runs in the calling process (`in_process`), never in a reward
worker: `rewards.score` starts the workers' rewards first, judges here meanwhile, then collects.
"""

from __future__ import annotations

from pathlib import Path

from cascadec import rewarding
from cascadec.judging import RUBRIC_ANSWERS, RUBRIC_TEMPLATE, template_error

from .judges import (JudgeError, answer_margins, answer_token, batched, conversation_text, is_reward_model,
                     judged_text, load, sigmoid)
from .rewards import answer_part

MODES = rewarding.RUBRIC_MODES
ANSWER_AFTER = "Answer:"  # how the default template ends: the answer words must be one token after it


class RubricReward:
    """``f(prompts, completions, *, rubric, **columns)`` → per completion, the share of its record's
    rubric items the judge finds met (``mode="soft"``: the mean P(yes)); see the module docstring."""

    gate = False
    in_process = True  # holds a model: scored in the calling process, never pickled into a worker

    def __init__(self, name: str, model, tokenizer, *, template: str | None = None,
                 answers: tuple[str, str] = RUBRIC_ANSWERS, mode: str = "hard", temperature: float = 1.0,
                 batch_size: int = 16):
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = template or RUBRIC_TEMPLATE
        if error := template_error(template, "rubric_model"):
            raise JudgeError(f"judge '{name}': {error}")
        if mode not in MODES:
            raise JudgeError(f"judge '{name}': mode {mode!r}; a rubric judge's mode is hard or soft")
        if len(answers) != 2 or answers[0] == answers[1]:
            raise JudgeError(f"judge '{name}': `answers` {list(answers)!r} must be two different words (met, not met)")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.mode, self.temperature, self.batch_size = mode, float(temperature), int(batch_size)
        self.template = ImmutableSandboxedEnvironment(undefined=StrictUndefined,
                                                      keep_trailing_newline=True).from_string(template)
        fix = f"; or set the judge's `answers` to two words that are, after `{ANSWER_AFTER}`"
        self.choices = [answer_token(name, tokenizer, a, answers, before=ANSWER_AFTER, fix=fix) for a in answers]

    def render(self, messages: list[dict], response: str, criterion: str) -> str:
        """The judge's prompt for one response and one rubric item."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return self.template.render(conversation=conversation_text(messages), messages=messages, question=question,
                                    response=response, criterion=criterion)

    def p_yes(self, texts: list[str]) -> list[float]:
        """P(yes) of each rendered judge prompt, the judge's forwards in padded batches."""
        margins = batched(lambda ids, mask: answer_margins(self.model, self.choices, ids, mask), texts,
                          self.batch_size, self.tokenizer)
        return [sigmoid(m / self.temperature) for m in margins]

    def __call__(self, prompts, completions, *, rubric=None, completion_finish=None, completion_looped=None,
                 **columns) -> list[float | None]:
        n = len(completions)
        rubric = rubric or [None] * n
        finish = completion_finish or ["eos"] * n
        looped = completion_looped or [False] * n
        out: list[float | None] = [None] * n
        asked: list[tuple[int, str]] = []  # (completion, rendered prompt), one per rubric item
        for i, (messages, text, items) in enumerate(zip(prompts, completions, rubric)):
            if not items:
                continue
            response = judged_text(text, finish=finish[i], looped=looped[i], strip_thinking=True)
            if response is None:
                out[i] = 0.0
                continue
            response = answer_part(response).strip()  # after a lone </think>: thinking the prompt opened
            asked += [(i, self.render(messages, response, item)) for item in items]
        if not asked:
            return out
        p = self.p_yes([t for _, t in asked])
        per: dict[int, list[float]] = {}
        for (i, _), q in zip(asked, p):
            per.setdefault(i, []).append(float(q > 0.5) if self.mode == "hard" else q)
        for i, values in per.items():
            out[i] = sum(values) / len(values)
        return out


def build(name: str, config: dict, model_dir: Path | None, *, device=None) -> RubricReward:
    """The rubric reward of the plan's ``config.judges[name]`` (resolved by cascadec/rewarding.py),
    its judge loaded from ``model_dir`` (the stage's `judge:<name>` input) onto ``device``."""
    if model_dir is None:
        raise JudgeError(f"judge '{name}' of kind rubric_model has no model checkpoint (the stage has no "
                         f"`judge:{name}` input; plan it again with `cascadec plan`)")
    model, tokenizer = load(model_dir, device)
    if is_reward_model(model.config):
        raise JudgeError(f"judge '{name}': {model_dir} is a {model.config.architectures[0]}, a reward model; a "
                         f"rubric_model judge is a causal LM that answers Yes or No (use it as a pairwise_model judge)")
    return RubricReward(name, model, tokenizer, template=config["template"], answers=tuple(config["answers"]),
                        mode=config["mode"], temperature=config["temperature"], batch_size=config["batch_size"])
