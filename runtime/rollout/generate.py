"""The generation engine: samples from the policy for online DPO and GRPO.

One interface, `Engine`, with one backend here, `TorchEngine` (any Hugging Face causal LM, in
the training process). A server backend (vLLM, SGLang) implements the same two methods:
`generate` sends the prompts to the server, and `update` pushes the policy's new weights to it
(vLLM's weight-sync / NCCL group); the odpo and grpo stages call only `engine(...)`,
`generate` and `update`, so plugging a server in touches no stage. cascadec has no vLLM
dependency.

**Determinism contract.** Sample i depends only on (model weights, ``prompts[i]``,
``sampling``, ``seed``, ``keys[i]``): its random stream is a generator seeded by
``(seed, keys[i])`` and nothing else, so it does not depend on the rows it shares a batch
with, the engine's ``batch_size``, earlier calls or the process. A stage seeds with its step
and keys with the prompt's global index (and sample number): a resumed run and a run split
over two processes draw exactly the samples of a single uninterrupted one. The one caveat
is arithmetic: a batch of a different shape may round a logit differently in the last ulp
(a different BLAS blocking, padding), which changes a sample only when it lands exactly on
a probability boundary (greedy: a near-exact tie) — about 1e-7 per token in float32.

**How a batch runs.** Prompts are sorted by length (long first) and cut into batches of
``batch_size`` (less padding); each batch is left-padded with an attention mask and explicit
position ids (``cumsum(mask) - 1``, as `model.generate` does), prefilled once keeping only the
last position's logits, then decoded one token per step through a KV cache
whose buffers grow by doubling (`GrowingLayer`: a step writes in place, where transformers'
`DynamicLayer` reallocates the whole cache). Rows that finish leave the batch (the cache, mask and state
are compacted), so a long tail does not pay for finished rows. The model runs in eval mode
under `torch.inference_mode()`; its training mode is restored afterwards.

**Sampling.** ``temperature == 0`` is greedy. Otherwise the softmax of ``logits /
temperature``, truncated to the nucleus (the smallest set of most likely tokens whose mass is
≥ ``top_p``; at least one token) and renormalised, is sampled by inverse CDF with one uniform
per row and step from the row's own stream. The nucleus comes from a top-64 partial sort;
only rows whose 64 best tokens hold less than ``top_p`` fall back to a full sort.

**Finish reasons.** ``"eos"``: the model emitted an end token (the tokenizer's
``eos_token_id`` or any of the model's ``generation_config.eos_token_id``), kept in ``ids``;
``"stop"``: the decoded text reached a stop string, ``ids`` end with the token that completes
it; ``"loop"``: the loop detector (`loops.py`) fired and ``sampling.stop_on_loop`` is set;
``"length"``: ``max_new_tokens`` generated. Stop strings are checked on the decoded tail only
(the last ``len(longest stop) + 2`` tokens, each of which decodes to at least one character),
so the check costs O(tail) per step, not O(text).

**Progress.** After each call ``engine.last`` holds a `Stats` (prompts, generated tokens,
seconds, tokens/s); ``engine.total`` sums every call. The odpo and grpo stages show
``last.tokens_per_s`` as "gen tok/s" in their progress bars and record the totals in their
metrics.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from cascadec.runtime.rollout import loops

NUCLEUS_TOP_K = 64  # the nucleus is searched among this many best tokens before a full sort


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass is ≥ top_p (≥ 1 token)."""
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    """Stop strings, checked on the decoded text."""
    stop_on_loop: bool = True
    """End a sample early once the loop detector fires (finish "loop")."""


@dataclass(frozen=True)
class Completion:
    ids: list[int]
    """Generated token ids: the EOS included when finish == "eos"; cut right after the stop
    string's last token when finish == "stop"."""
    text: str
    """The ids decoded without special tokens."""
    finish: str
    """"eos" | "stop" | "length" | "loop"."""
    looped: bool
    """The loop detector fired (finish "loop", or the finished ids end in a loop)."""
    logprobs: list[float]
    """Per generated token: its log-prob under the model's own (untempered, unfiltered)
    distribution, float32."""


@dataclass(frozen=True)
class Stats:
    prompts: int = 0
    tokens: int = 0
    """Generated tokens (EOS and stop tokens included)."""
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.prompts + other.prompts, self.tokens + other.tokens, self.seconds + other.seconds)


class Engine(Protocol):
    last: Stats
    total: Stats

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, *, seed: int,
                 keys: Sequence[int] | None = None) -> list[Completion]:
        """One Completion per prompt, in order (repeat a prompt to get several samples); sample i
        depends only on (model, prompts[i], sampling, seed, keys[i]); keys default to
        range(len(prompts))."""

    def update(self, model) -> None:
        """Take new weights (a server backend syncs them to the server here)."""


def engine(model, tokenizer, *, backend: str = "torch", batch_size: int = 32) -> Engine:
    """The generation engine for ``model`` (a Hugging Face causal LM) and its tokenizer."""
    if backend != "torch":
        raise ValueError(f"unknown generation backend {backend!r}; this runtime has 'torch'")
    return TorchEngine(model, tokenizer, batch_size=batch_size)


def row_seed(seed: int, key: int) -> int:
    """The seed of one sample's random stream: a hash of (seed, key), so nearby pairs such as
    (0, 1) and (1, 0) get unrelated streams."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(key)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def eos_ids(model, tokenizer) -> list[int]:
    """The end tokens: the tokenizer's and the model's generation config's (an int or a list)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in ([config_eos] if isinstance(config_eos, int) else config_eos))
    return sorted(ids)


class TorchEngine:
    """Batched sampling from a Hugging Face causal LM in this process (see the module docstring)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"generation batch_size must be at least 1, got {batch_size}")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.last, self.total = Stats(), Stats()
        self.update(model)

    def update(self, model) -> None:
        """Hold the new module (the torch backend samples from the live weights)."""
        self.model = model
        self.eos = eos_ids(model, self.tokenizer)
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad = int(pad if pad is not None else (self.eos[0] if self.eos else 0))

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, *, seed: int,
                 keys: Sequence[int] | None = None) -> list[Completion]:
        _check(prompts, sampling, keys)
        keys = list(range(len(prompts))) if keys is None else list(keys)
        start = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        out: list[Completion | None] = [None] * len(prompts)
        training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for b in range(0, len(order), self.batch_size):
                    rows = order[b:b + self.batch_size]
                    done = self._batch([prompts[i] for i in rows], sampling,
                                       [row_seed(seed, keys[i]) for i in rows])
                    for i, completion in zip(rows, done):
                        out[i] = completion
        finally:
            self.model.train(training)
        self.last = Stats(len(prompts), sum(len(c.ids) for c in out), time.perf_counter() - start)
        self.total = self.total + self.last
        return out

    def _batch(self, prompts: list[Sequence[int]], sampling: Sampling, seeds: list[int]) -> list[Completion]:
        model, n, new = self.model, len(prompts), sampling.max_new_tokens
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width + new), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):width] = 1
        ids, mask = ids.to(device), mask.to(device)
        position = (mask[:, :width].cumsum(-1) - 1).masked_fill(mask[:, :width] == 0, 1)
        uniforms = None
        if sampling.temperature > 0:
            uniforms = torch.stack([torch.rand(new, generator=torch.Generator().manual_seed(s)) for s in seeds])
            uniforms = uniforms.to(device)
        eos = torch.tensor(self.eos, dtype=torch.long, device=device)
        tracker = loops.Tracker(n, device=device) if sampling.stop_on_loop else None
        tail = max((len(s) for s in sampling.stop), default=0) + 2
        alive = list(range(n))  # original row of each batch row
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps = torch.zeros((n, new), dtype=torch.float32, device=device)
        finish: list[str | None] = [None] * n

        cache = kv_cache(model.config, width + new)
        logits = self._forward(ids, mask[:, :width], position, cache)
        position = position[:, -1:]
        for step in range(new):
            pick, logp = choose(logits, sampling, None if uniforms is None else uniforms[:, step])
            alive_t = torch.as_tensor(alive, device=device)
            logps[alive_t, step] = logp
            ended = torch.isin(pick, eos)
            looped = tracker.push(pick) if tracker is not None else torch.zeros_like(ended)
            picks, ended, looped = pick.tolist(), ended.tolist(), looped.tolist()
            for r, tok in zip(alive, picks):
                tokens[r].append(tok)
            stopped = self._stopped([tokens[r] for r in alive], sampling.stop, tail)
            keep = []
            for j, r in enumerate(alive):
                reason = ("eos" if ended[j] else "stop" if stopped[j] else "loop" if looped[j]
                          else "length" if step == new - 1 else None)
                if reason:
                    finish[r] = reason
                else:
                    keep.append(j)
            if not keep:
                break
            next_tokens = pick
            if len(keep) < len(alive):  # compaction: finished rows leave the batch
                index = torch.as_tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, position, next_tokens = mask[index], position[index], pick[index]
                if uniforms is not None:
                    uniforms = uniforms[index]
                if tracker is not None:
                    tracker.keep(index)
                alive = [alive[j] for j in keep]
            mask[:, width + step] = 1
            position = position + 1
            logits = self._forward(next_tokens[:, None], mask[:, :width + step + 1], position, cache)

        logps = logps.cpu()
        out = []
        for r in range(n):
            text = self.tokenizer.decode(tokens[r], skip_special_tokens=True)
            looped = finish[r] == "loop" or loops.looping(tokens[r])
            out.append(Completion(tokens[r], text, finish[r], looped, logps[r, :len(tokens[r])].tolist()))
        return out

    def _forward(self, ids, mask, position, cache):
        """Logits of the last position, float32 (one step of the KV-cached decoder)."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1, :].float()

    def _stopped(self, rows: list[list[int]], stops: tuple[str, ...], tail: int) -> list[bool]:
        """Whether each row's decoded tail contains a stop string (only the tail is decoded)."""
        if not stops:
            return [False] * len(rows)
        texts = self.tokenizer.batch_decode([t[-tail:] for t in rows], skip_special_tokens=True)
        return [any(s in text for s in stops) for text in texts]


class GrowingLayer(DynamicLayer):
    """One layer's KV cache in buffers that grow by doubling: a decode step writes its token in
    place, where transformers' `DynamicLayer` concatenates (reallocates and copies the whole
    cache) at every step — O(T²) copying over a T-token generation instead of O(T). ``limit``:
    the most tokens the layer will hold (prompt + max new tokens), so doubling never
    allocates beyond it."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.size, self.key_buffer, self.value_buffer = 0, None, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.size + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            capacity = max(end, 2 * (0 if self.key_buffer is None else self.key_buffer.shape[-2]), 64)
            capacity = max(end, min(capacity, self.limit or capacity))
            self.key_buffer = _grown(self.key_buffer, key_states, self.size, capacity)
            self.value_buffer = _grown(self.value_buffer, value_states, self.size, capacity)
        self.key_buffer[:, :, self.size:end] = key_states
        self.value_buffer[:, :, self.size:end] = value_states
        self.size = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized and self.size:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :self.size], self.value_buffer[:, :, :self.size]


def _grown(buffer, like, size: int, capacity: int):
    shape = (*like.shape[:2], capacity, like.shape[-1])
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    if buffer is not None and size:
        out[:, :, :size] = buffer[:, :, :size]
    return out


ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def kv_cache(config, limit: int | None = None):
    """A growing-buffer KV cache (up to ``limit`` tokens) for decoders made of attention layers
    only (every layer keeps all its tokens; a sliding-window layer's mask still limits what it
    sees); transformers' own `DynamicCache` for any other layer kind (linear attention...)."""
    text = config.get_text_config(decoder=True)
    if set(getattr(text, "layer_types", None) or ["full_attention"]) <= ATTENTION_LAYERS:
        cache = DynamicCache()
        cache.layer_class_to_replicate = functools.partial(GrowingLayer, limit)
        return cache
    return DynamicCache(config=config)


def choose(logits, sampling: Sampling, uniforms=None):
    """The next token per row and its untempered log-prob (float32).

    ``logits``: [rows, vocab] float32; ``uniforms``: [rows] in [0, 1), one per row (None for
    greedy). Sampling is by inverse CDF over the tempered, nucleus-truncated distribution.
    """
    logz = torch.logsumexp(logits, dim=-1)
    if sampling.temperature == 0:
        pick = logits.argmax(dim=-1)
    else:
        scaled = logits / sampling.temperature
        if sampling.top_p >= 1.0:
            cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
            pick = _inverse_cdf(cdf, uniforms * cdf[:, -1])
        else:
            pick = _nucleus(scaled, sampling.top_p, uniforms)
    return pick, logits.gather(1, pick[:, None])[:, 0] - logz


def _inverse_cdf(cdf, targets):
    """The first index whose cumulative mass exceeds the target (clamped into range)."""
    return torch.searchsorted(cdf, targets[:, None].contiguous(), right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)


def _nucleus(scaled, top_p: float, uniforms):
    """Sample from the nucleus of softmax(scaled): the smallest top set with mass ≥ top_p."""
    logz = torch.logsumexp(scaled, dim=-1, keepdim=True)
    k = min(NUCLEUS_TOP_K, scaled.shape[-1])
    values, index = scaled.topk(k, dim=-1)
    pick = torch.empty(scaled.shape[0], dtype=torch.long, device=scaled.device)
    short = (values - logz).exp().sum(dim=-1) < top_p  # rows whose k best do not reach top_p
    if bool(short.any()):
        rows = short.nonzero()[:, 0]
        full_values, full_index = scaled[rows].sort(dim=-1, descending=True)
        pick[rows] = _nucleus_sorted(full_values - logz[rows], full_index, top_p, uniforms[rows])
    if not bool(short.all()):
        rows = (~short).nonzero()[:, 0]
        pick[rows] = _nucleus_sorted(values[rows] - logz[rows], index[rows], top_p, uniforms[rows])
    return pick


def _nucleus_sorted(logp, index, top_p: float, uniforms):
    """Inverse-CDF sampling within the nucleus of descending log-probs ``logp`` (token ids
    ``index``): a token is kept when the mass before it is < top_p, so the first always is."""
    cdf = logp.exp().cumsum(dim=-1)
    kept = ((cdf - logp.exp()) < top_p).sum(dim=-1)  # nucleus size, ≥ 1
    mass = cdf.gather(1, (kept - 1)[:, None])[:, 0]
    j = _inverse_cdf(cdf, uniforms * mass)
    j = torch.minimum(j, kept - 1)
    return index.gather(1, j[:, None])[:, 0]


def _check(prompts, sampling: Sampling, keys) -> None:
    if sampling.temperature < 0:
        raise ValueError(f"sampling temperature must be ≥ 0 (0 = greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"sampling top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"sampling max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts: give one key per prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: a prompt needs at least one token (a BOS or the chat "
                         "template's prefix)")
