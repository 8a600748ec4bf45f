"""Pairwise judges: P(a ≻ b) for two answers to one prompt, and the rules every judge is wrapped in.

Owns the four judge kinds, `preferences` (loopers and unterminated samples lose, thinking
stripped) and the pieces every LM judge shares (`load`, `judged_text`, `answer_token`,
`answer_margins`, `batched`; the rubric reward, rubric.py, is built from them). It must not
generate, train or know about stages; odpo builds one with `build_judge`.

Kinds (a plan's judge kind `pairwise_model` picks the first two by the checkpoint's
`architectures`; docs/runtime.md, "Preference optimisation"):

- **LM judge** (any causal checkpoint): the template (`cascadec.judging.DEFAULT_TEMPLATE` unless
  the spec gives one) shows the conversation and answers A and B and ends where the judge writes
  its verdict; ℓA, ℓB are the logits of the tokens " A" and " B" there. Order-debiased:
  P = ½[σ(d(a, b)/T) + σ(−d(b, a)/T)] with d(x, y) = ℓA − ℓB when x is shown as A, so swapping
  a and b gives exactly 1 − P and a judge that always prefers the first slot is neutralised.
  Both orders of a batch of pairs go through one forward pass; only the two answer rows of the
  LM head are applied, to the last position of each prompt.
- **Reward model** (`…ForSequenceClassification`, one label): r = the model's score of the
  conversation with the answer as the assistant turn, rendered by the judge tokenizer's chat
  template (the default one when it has none); P = σ((r_a − r_b)/T).
- **Callable** (`function: "module:function"`): ``f(prompts, a, b, **columns) -> list[float]``,
  probabilities, checked; the temperature applies to their logit: P = σ(logit(f)/T).
- **Rewards compared** (`compare_rewards`, `RewardJudge`): grpo's rewards (rewards.py) score each
  answer and are totalled exactly as grpo totals them (weights, the format gate); P = σ((R_a − R_b)/T),
  T = 0.1 by default (cascadec/judging.py says why). A pair where either answer has no applicable
  reward is a tie, P = ½: the rewards cannot tell the two apart, so there is nothing to learn.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from cascadec.judging import COMPARE, COMPARE_TEMPERATURE, DEFAULT_TEMPLATE, FUNCTION, template_error

from ..data import chat
from . import rewards as rewarding

CHOICES = (" A", " B")
BATCH_SIZE = 8  # pairs per forward pass (each pair is two sequences); the plan's `batch_size` overrides
BAD_FINISH = ("length", "loop")
THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)


class JudgeError(ValueError):
    """A judge that cannot be built or that answered garbage; the message names the judge."""


@dataclass(frozen=True)
class Candidate:
    """One answer as the rules see it: its text and how its generation ended."""

    text: str
    finish: str = "eos"  # as Completion.finish: "eos" | "stop" | "length" | "loop"
    looped: bool = False
    ids: tuple[int, ...] | None = None  # the generated token ids, for a judge that counts tokens


class Judge(Protocol):
    def prefer(self, prompts: list[list[dict]], a: list[str], b: list[str],
               columns: list[dict] | None = None) -> list[float]:
        """P(a ≻ b) per item, calibrated by the judge's temperature; ``prompts`` are message lists."""
        ...


# ---------------------------------------------------------------------------------------------
# The rules around any judge


def preferences(judge: Judge, prompts, a: list[Candidate], b: list[Candidate], *,
                strip_thinking: bool = False, columns=None) -> list[float]:
    """P(a ≻ b) per pair, with the rules applied before the judge is asked.

    A sample that looped, or never terminated (finish "length" or "loop"), loses to a clean one
    (P = 0 or 1) and two such samples tie (P = ½): the judge is asked only about clean pairs, so
    it is never asked to rank degenerate text. With ``strip_thinking``, `<think>…</think>` blocks
    are removed before judging, and a sample whose thinking never closes has no answer at all:
    it counts as unterminated. A judge with ``counts_tokens`` (a compare_rewards judge, whose length
    penalty counts the generated tokens, thinking included) also gets each answer's token ids.
    """
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"{len(prompts)} prompts, {len(a)} answers a and {len(b)} answers b; one each per pair")
    texts_a = [_answer(c, strip_thinking) for c in a]
    texts_b = [_answer(c, strip_thinking) for c in b]
    out: list[float | None] = []
    for x, y in zip(texts_a, texts_b):
        out.append(0.5 if x is None and y is None else 0.0 if x is None else 1.0 if y is None else None)
    ask = [i for i, p in enumerate(out) if p is None]
    if ask:
        cols = [columns[i] for i in ask] if columns is not None else None
        ids = {}
        if getattr(judge, "counts_tokens", False) and all(c.ids is not None for c in (*a, *b)):
            ids = {"ids": ([list(a[i].ids) for i in ask], [list(b[i].ids) for i in ask])}
        for i, p in zip(ask, judge.prefer([prompts[i] for i in ask], [texts_a[i] for i in ask],
                                          [texts_b[i] for i in ask], cols, **ids)):
            out[i] = float(p)
    return out


def _answer(c: Candidate, strip_thinking: bool) -> str | None:
    return judged_text(c.text, finish=c.finish, looped=c.looped, strip_thinking=strip_thinking)


def judged_text(text: str, *, finish: str = "eos", looped: bool = False, strip_thinking: bool = False) -> str | None:
    """The text a judge sees, or None for a sample no judge is asked about: it looped or never
    terminated (finish "length" or "loop"), or, with ``strip_thinking``, its thinking never closes."""
    if looped or finish in BAD_FINISH:
        return None
    if not strip_thinking:
        return text
    text = THINKING.sub("", text)
    return None if "<think>" in text else text.strip()


# ---------------------------------------------------------------------------------------------
# Building a judge from the plan


def build_judge(name: str, config: dict, model_dir: Path | None, *, device=None,
                judges: dict | None = None, inputs: dict | None = None) -> Judge:
    """The judge the plan's ``config.judges[name]`` describes (``model_dir``: its `judge:<name>` input;
    ``judges``: the stage's whole ``config.judges``, where a compare_rewards judge finds its rewards;
    ``inputs``: the stage's inputs, where a rubric_model reward it totals finds its checkpoint)."""
    kind = config.get("kind")
    temperature = float(config.get("temperature") or (COMPARE_TEMPERATURE if kind == COMPARE else 1.0))
    batch_size = int(config.get("batch_size") or BATCH_SIZE)
    if kind == "callable":
        return CallableJudge(name, config.get("function"), temperature=temperature)
    if kind == COMPARE:
        named = list(config.get("rewards") or ())
        missing = [r for r in named if r not in (judges or {})]
        if not named or missing:
            raise JudgeError(f"judge '{name}' of kind {COMPARE} names rewards {named} but the plan's judges hold "
                             f"{sorted(judges or {})}; make the plan again with `cascadec plan`")
        try:
            scorers = rewarding.build_rewards({r: judges[r] for r in named}, inputs, device=device)
        except ValueError as e:
            raise JudgeError(f"judge '{name}': {e}") from None
        return RewardJudge(name, scorers, temperature=temperature)
    if kind != "pairwise_model":
        raise JudgeError(f"judge '{name}' is of kind {kind!r}, a reward (grpo), not a pairwise judge; "
                         f"odpo needs a judge of kind pairwise_model, callable or {COMPARE}")
    if model_dir is None:
        raise JudgeError(f"judge '{name}' of kind pairwise_model has no model checkpoint")
    model, tokenizer = load(model_dir, device)
    if is_reward_model(model.config):
        return RewardModelJudge(name, model, tokenizer, temperature=temperature, batch_size=batch_size)
    return LMJudge(name, model, tokenizer, template=config.get("template"), temperature=temperature,
                   batch_size=batch_size)


def load(model_dir: Path, device=None) -> tuple:
    """(model, tokenizer) of a judge checkpoint, in eval mode on ``device`` (default: cuda when there
    is one), in the checkpoint's own dtype on a GPU and fp32 on a CPU; loaded once, by the stage's
    main process. A `…ForSequenceClassification` checkpoint loads as a reward model, any other as
    a causal LM."""
    import transformers as tf

    from ..training.models import model_class

    hf_config = tf.AutoConfig.from_pretrained(model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = "auto" if device.type == "cuda" else torch.float32
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    if is_reward_model(hf_config):
        model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
    else:
        model = model_class(hf_config).from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval(), tokenizer


def is_reward_model(config) -> bool:
    """A checkpoint whose architecture is a `…ForSequenceClassification` (a reward model)."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or ())


# ---------------------------------------------------------------------------------------------
# Causal-LM judge


class LMJudge:
    """A causal LM asked "which answer is better, A or B?"; P from its " A" / " B" logits, both orders."""

    def __init__(self, name: str, model, tokenizer, *, template: str | None = None, temperature: float = 1.0,
                 batch_size: int = BATCH_SIZE):
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = template or DEFAULT_TEMPLATE
        if error := template_error(template):
            raise JudgeError(f"judge '{name}': {error}")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.temperature, self.batch_size = temperature, batch_size
        self.template = ImmutableSandboxedEnvironment(undefined=StrictUndefined,
                                                      keep_trailing_newline=True).from_string(template)
        self.choices = [answer_token(name, tokenizer, c, CHOICES) for c in CHOICES]

    def render(self, messages: list[dict], a: str, b: str) -> str:
        """The judge's prompt with ``a`` shown as answer A and ``b`` as answer B."""
        return self.template.render(conversation=conversation_text(messages), messages=messages, a=a, b=b)

    def prefer(self, prompts, a, b, columns=None) -> list[float]:
        texts = [self.render(m, x, y) for m, x, y in zip(prompts, a, b)]
        swapped = [self.render(m, y, x) for m, x, y in zip(prompts, a, b)]
        d = batched(self._margins, [*texts, *swapped], self.batch_size * 2, self.tokenizer)
        n, t = len(texts), self.temperature
        return [0.5 * (sigmoid(d[i] / t) + sigmoid(-d[n + i] / t)) for i in range(n)]

    def _margins(self, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
        return answer_margins(self.model, self.choices, ids, mask)


@torch.inference_mode()
def answer_margins(model, choices: Sequence[int], ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """ℓ(choices[0]) − ℓ(choices[1]) at each right-padded row's last token: the decoder's final
    hidden state times the two answer rows of the LM head (the full [rows × vocab] logits are never
    made). Any head bias is added, so the margin equals the one from the model's own logits."""
    head = model.get_output_embeddings()
    device = head.weight.device
    ids, mask = ids.to(device), mask.to(device)
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    last = hidden[torch.arange(ids.shape[0], device=device), mask.sum(-1) - 1]
    logits = (last @ head.weight[list(choices)].T).double()
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[list(choices)].double()
    return (logits[:, 0] - logits[:, 1]).tolist()


def conversation_text(messages: list[dict]) -> str:
    """Messages as `Role: content` paragraphs (the template's ``conversation``)."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def answer_token(name: str, tokenizer, text: str, choices: Sequence[str], *, before: str = "Better answer:",
                 fix: str = "") -> int:
    """The one token ``text`` adds after a prompt that ends like the template's (``before``)."""
    base = tokenizer(before, add_special_tokens=False)["input_ids"]
    full = tokenizer(before + text, add_special_tokens=False)["input_ids"]
    if full[:len(base)] != base or len(full) != len(base) + 1:
        pieces = tokenizer.convert_ids_to_tokens(full[len(base):] if full[:len(base)] == base else full)
        raise JudgeError(f"judge '{name}': the answer {text!r} is not one token in the judge's tokenizer "
                         f"(it is {pieces}); the LM judge reads P from one token per answer, so it needs "
                         f"a tokenizer with {' and '.join(repr(c) for c in choices)} as single tokens{fix}")
    return full[-1]


# ---------------------------------------------------------------------------------------------
# Reward model


class RewardModelJudge:
    """A sequence-classification reward model: P = σ((r_a − r_b)/T)."""

    def __init__(self, name: str, model, tokenizer, *, temperature: float = 1.0, batch_size: int = BATCH_SIZE):
        if model.config.num_labels != 1:
            raise JudgeError(f"judge '{name}': the reward model has {model.config.num_labels} labels; "
                             f"a reward model scores with one (num_labels 1)")
        if model.config.pad_token_id is None:  # it finds each row's last token by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.temperature, self.batch_size = temperature, batch_size

    def encode(self, messages: list[dict], answer: str) -> list[int]:
        """The conversation with ``answer`` as the assistant turn, as the judge's chat template renders it."""
        return chat.encode(self.tokenizer, [*messages, {"role": "assistant", "content": answer}]).ids

    def prefer(self, prompts, a, b, columns=None) -> list[float]:
        seqs = [self.encode(m, x) for m, x in zip(prompts, a)] + [self.encode(m, y) for m, y in zip(prompts, b)]
        r = batched(self._scores, seqs, self.batch_size * 2, self.tokenizer, pad_id=self.model.config.pad_token_id)
        n = len(prompts)
        return [sigmoid((r[i] - r[n + i]) / self.temperature) for i in range(n)]

    @torch.inference_mode()
    def _scores(self, ids: torch.Tensor, mask: torch.Tensor) -> list[float]:
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].double().tolist()


# ---------------------------------------------------------------------------------------------
# Callable


class CallableJudge:
    """``module:function`` with contract ``f(prompts, a, b, **columns) -> list[float]`` (probabilities)."""

    def __init__(self, name: str, function: str | None, *, temperature: float = 1.0):
        if not isinstance(function, str) or not FUNCTION.match(function):
            raise JudgeError(f"judge '{name}' of kind callable needs `function: \"module:function\"`, "
                             f"got {function!r}")
        module, attr = function.split(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise JudgeError(f"judge '{name}': cannot import module '{module}' of function '{function}': {e}") from e
        except AttributeError:
            raise JudgeError(f"judge '{name}': module '{module}' has no function '{attr}'") from None
        if not callable(fn):
            raise JudgeError(f"judge '{name}': '{function}' is not a function but a {type(fn).__name__}")
        self.name, self.function, self.fn, self.temperature = name, function, fn, temperature

    def prefer(self, prompts, a, b, columns=None) -> list[float]:
        kwargs = _columns(columns, len(prompts))
        got = self.fn(prompts, a, b, **kwargs)
        out = self._check(got, len(prompts))
        t = self.temperature
        return out if t == 1.0 else [sigmoid(_logit(p) / t) for p in out]

    def _check(self, got, n: int) -> list[float]:
        where = f"judge '{self.name}': function '{self.function}'"
        contract = "it must return one P(a ≻ b) in [0, 1] per pair"
        if isinstance(got, (str, bytes, dict)) or not hasattr(got, "__len__"):
            raise JudgeError(f"{where} returned a {type(got).__name__}, not a list; {contract}")
        if len(got) != n:
            raise JudgeError(f"{where} returned {len(got)} values for {n} pairs; {contract}")
        out = []
        for i, v in enumerate(got):
            try:
                ok = not isinstance(v, (bool, str, bytes)) and 0.0 <= float(v) <= 1.0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise JudgeError(f"{where} returned {v!r} for pair {i}; {contract}")
            out.append(float(v))
        return out


# ---------------------------------------------------------------------------------------------
# Rewards compared


class RewardJudge:
    """P(a ≻ b) = σ((R_a − R_b)/T), R = an answer's weighted reward total (``rewards.total``).

    Both answers of every pair are scored in one ``rewards.score`` call, in this process: code
    tests still run in the sandbox's subprocesses, and the gate (format) stops the grading of an
    answer that fails it, as in grpo. Where either total is None (no reward applies) the pair ties.
    Every value computed is kept until `take` hands them over (the stage's per-reward metrics).
    """

    counts_tokens = True  # `preferences` passes the answers' token ids (the length penalty counts them)

    def __init__(self, name: str, rewards: dict, *, temperature: float = COMPARE_TEMPERATURE):
        self.name, self.rewards, self.temperature = name, rewards, temperature
        self.weights = {r: w for r, (_, w) in rewards.items()}
        self.seen: dict[str, list[float | None]] = {r: [] for r in rewards}

    def totals(self, prompts, completions, columns: dict[str, list]) -> list[float | None]:
        """Each completion's reward total, None where no reward applies."""
        scores = rewarding.score(self.rewards, prompts, completions, columns, workers=0)
        for r, values in scores.items():
            self.seen[r] += values
        return rewarding.total(scores, self.weights)

    def take(self) -> dict[str, list[float | None]]:
        """Each reward's values since the last `take` (None where it did not apply), and forget them."""
        out, self.seen = self.seen, {r: [] for r in self.rewards}
        return out

    def prefer(self, prompts, a, b, columns=None, ids=None) -> list[float]:
        n = len(prompts)
        both = {k: v + v for k, v in _columns(columns, n).items()}
        if ids is not None:
            both["completion_ids"] = [*ids[0], *ids[1]]
        try:
            r = self.totals([*prompts, *prompts], [*a, *b], both)
        except (rewarding.RewardError, ValueError) as e:
            raise JudgeError(f"judge '{self.name}': {e}") from None
        t = self.temperature
        return [0.5 if r[i] is None or r[n + i] is None else sigmoid((r[i] - r[n + i]) / t) for i in range(n)]


def _columns(columns: list[dict] | None, n: int) -> dict[str, list]:
    """Per-pair column dicts as one list per column name (None where a pair lacks it)."""
    if not columns:
        return {}
    names = sorted({k for c in columns for k in c} - {"prompts", "a", "b"})
    return {k: [c.get(k) for c in columns] for k in names}


# ---------------------------------------------------------------------------------------------
# Shared


def batched(forward, items: Sequence, batch_rows: int, tokenizer, *, pad_id: int | None = None) -> list[float]:
    """``forward(ids, mask)`` over ``items`` (texts or id lists), ``batch_rows`` right-padded rows at a time,
    longest first so that rows of similar lengths share a batch; results in the items' order."""
    seqs = [tokenizer(x)["input_ids"] if isinstance(x, str) else list(x) for x in items]
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[float] = [0.0] * len(seqs)
    for start in range(0, len(order), batch_rows):
        rows = order[start:start + batch_rows]
        width = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        for i, v in zip(rows, forward(ids, mask)):
            out[i] = v
    return out


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logit(p: float) -> float:
    return math.inf if p == 1.0 else -math.inf if p == 0.0 else math.log(p) - math.log1p(-p)
