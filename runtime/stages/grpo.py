"""The `grpo` stage: group-relative policy optimisation on prompts (`format: prompts`), Magistral's way.

Owns the on-policy step: which prompts a step reads, the groups it keeps, and its metrics.
Generation is `rollout/generate.py`'s engine, rewards `rollout/rewards.py`'s (in worker
processes), the arithmetic `training/policy.py`'s, per-token log-probs `training/preference.py`'s,
setup, optimiser, checkpoints and the final save `training/pairs.py` and `training/loop.py`'s.

Each step (one optimiser step; Magistral's n_batch = n_minibatch):

    global_batch prompts ─▶ G samples each (generation.samples) from the current policy
        ─▶ every reward of config.judges, weighted and summed (`rewards.score`, `rewards.total`)
        ─▶ groups whose G rewards are all equal are dropped; the shortfall is drawn again from
           the next prompts, at most `refill_rounds` extra rounds (a step may train on fewer)
        ─▶ advantages over the kept groups (`policy.advantages`, config.scale_rewards)
        ─▶ the clipped objective, normalised by config.loss_type, summed over micro-batches

The sampling policy is the policy being trained and there is one update per batch, so the old
log-probs are the current ones, detached: the ratio is exactly 1 in the forward pass and only its
gradient (∇ log π) drives the update, as in TRL with num_iterations = 1. num_iterations > 1 (μ
updates on one batch) is refused. A completion no reward applies to (every reward returned None)
takes its group's mean reward: advantage 0 before the minibatch normalisation (TRL's rule).

Determinism: the prompt drawn at global slot g is `pairs.order`'s; sample k of it is drawn with
seed derive(stage seed, "sample", step) and key G·g + k, and the next slot is saved with every
step checkpoint. So a resumed run draws exactly the samples and prompts of an uninterrupted one.

Several processes (ddp or fsdp) make the update one process makes on the same plan:

- A round is global: its candidate slots (the step's global_batch, then each refill's shortfall)
  are cut into contiguous shares, one per process (`share`); each generates and scores its own.
  Sample k of slot g keeps key G·g + k, so it does not depend on the process that drew it.
- The processes then all-gather the round's completions and reward scores (`everyone`, in slot
  order), so each knows the same kept list and the same next slot: the first kept groups in slot
  order, exactly one process's, and the same number of rounds.
- The update: process k trains on the k-th contiguous share of the kept groups (sizes differ by at
  most one group). Advantages (the minibatch mean and std included) and the loss_type's weights
  (per-group, per-sequence, the batch's token count or B·T_max) are computed by every process
  over the whole kept batch, so the processes' losses sum to one process's loss; each multiplies
  its loss by the number of processes, since DDP's all-reduce and FSDP's reduce-scatter average
  the gradients. A process with fewer micro-batches (5 groups on 2 processes) runs extra ones on
  a copy of the first completion with weight 0 and no counted token, so every process runs the
  same number of forwards and backwards (FSDP's collectives; the gradients reduced on the last).
- Metrics come from the gathered completions and scores (rewards, lengths, dropped share) and
  from sums reduced over the processes (loss, clipped and scored tokens, entropy, KL); process 0
  writes them once. Generation throughput: all tokens over the slowest process's seconds.
- Under fsdp the policy is sharded as odpo's and samples come from a whole copy per process,
  refreshed from the shards before each step (`odpo.sampler`); a beta > 0 reference is sharded
  like odpo's (`pairs.frozen`). DCP step checkpoints carry the next slot and each process's RNG.

The all-gather moves every completion's ids and text to every process once per round: a step's
generated tokens × processes integers, small beside generating them. docs/runtime.md, "GRPO".
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from accelerate.utils import gather_object

from cascadec import grpo as settings

from ..context import StageContext
from ..data.chat import Example
from ..rollout import rewards as rewarding
from ..rollout.generate import Sampling
from ..training import fsdp, loop, pairs, policy
from ..training.preference import scored_logps
from .odpo import _frozen_dtype, _lap, read_prompts, sampler

SPLIT = ("generate_s", "reward_s", "update_s")  # where a step's time goes


def run(ctx: StageContext) -> dict:
    config = ctx.config
    o = options(config)
    gen = config.get("generation") or {}
    group = int(gen.get("samples", 8))
    sampling = Sampling(temperature=float(gen.get("temperature", 1.0)), top_p=float(gen.get("top_p", 1.0)),
                        max_new_tokens=int(gen.get("max_new_tokens", 256)), stop=tuple(gen.get("stop") or ()))

    # 1. Processes; the policy (trained), the reference only when beta > 0, the rewards; the prompts.
    s = pairs.setup(ctx)
    accelerator, tokenizer, seed, steps, micro = s.accelerator, s.tokenizer, s.seed, s.steps, s.micro
    rank, world = accelerator.process_index, accelerator.num_processes
    scored = functools.partial(TokenLogps, temperature=sampling.temperature or 1.0)  # greedy: T = 1
    reference = None
    if o["beta"] > 0:  # sharded like odpo's reference under fsdp (`pairs.frozen`)
        reference = pairs.frozen(ctx, s, _frozen_dtype(s.compute), wrap=functools.partial(scored, entropy=False))
    scorers = rewarding.build_rewards(config.get("judges") or {}, ctx.inputs, device=accelerator.device)
    weights = {name: w for name, (_, w) in scorers.items()}
    pool, _, counts = read_prompts(ctx, tokenizer, s.seq_len - sampling.max_new_tokens, 0, seed)
    order = pairs.order(len(pool), seed, bool(config["data"].get("shuffle", True)))
    ctx.log(f"grpo: {len(pool):,} prompts, {steps} steps of {s.global_batch} groups of {group} on {world} "
            f"process{'es' if world > 1 else ''}, rewards {', '.join(f'{n} ×{w:g}' for n, w in weights.items())}, "
            f"loss {o['loss_type']}, advantages {o['scale_rewards']}")

    # 2. Optimiser, schedule; the engine samples from the live weights (under fsdp from a whole copy
    #    per process, refreshed from the shards: odpo's `sampler`).
    objective, optimizer, scheduler = pairs.prepare(ctx, s, wrap=scored)
    policy_engine, refresh, _ = sampler(s, objective)
    workers = o["reward_workers"]
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) if workers > 0 else None
    state = loop.StepState(slot=0)
    spent = dict.fromkeys(SPLIT, 0.0)

    # 3. One step: rounds of generation over the global slots (each process a share), every kept
    #    group known to every process, then each process's share of the update.
    def one_step(step: int):
        clock = time.perf_counter()
        refresh()
        kept, seen = [], {"groups": 0, "dropped": 0, "rounds": 0, "tokens": 0, "generate_s": 0.0}
        samples_all, scores_all = [], {name: [] for name in scorers}
        while len(kept) < s.global_batch and seen["rounds"] <= o["refill_rounds"]:
            first = state.extra["slot"]
            slots = range(first, first + s.global_batch - len(kept))
            state.extra["slot"] = slots.stop
            lo, hi = share(len(slots), rank, world)
            mine = slots[lo:hi]
            prompts = [pool[order(g)] for g in mine for _ in range(group)]
            start = time.perf_counter()
            samples = []
            if mine:
                with accelerator.autocast():
                    samples = policy_engine.generate([q.ids for q in prompts], sampling,
                                                     seed=pairs.derive(seed, "sample", step),
                                                     keys=[group * g + k for g in mine for k in range(group)])
            generating = time.perf_counter() - start
            clock = _lap(spent, "generate_s", clock)
            scores = {name: [] for name in scorers}
            if mine:
                scores = rewarding.score(scorers, [q.messages for q in prompts], samples, columns(prompts),
                                         workers=workers, pool=executor)
            samples, scores, slowest = everyone(accelerator, samples, scores, generating)  # in slot order
            clock = _lap(spent, "reward_s", clock)
            seen["generate_s"] += slowest
            seen["tokens"] += sum(len(c.ids) for c in samples)
            batch = [pool[order(g)] for g in slots]
            totals = filled(rewarding.total(scores, weights), group)
            constant = policy.constant_groups(torch.tensor(totals, dtype=torch.float64), group).tolist()
            for j, q in enumerate(batch):
                rows = range(j * group, (j + 1) * group)
                if not (constant[j] and o["drop_constant_groups"]):
                    kept.append((q, [samples[i] for i in rows], [totals[i] for i in rows]))
            samples_all += samples
            for name in scorers:
                scores_all[name] += scores[name]
            seen["groups"] += len(batch)
            seen["dropped"] += sum(constant) if o["drop_constant_groups"] else 0
            seen["rounds"] += 1
        parts = update(accelerator, objective, reference, kept, group, o, micro=micro, pad_id=s.pad_id,
                       max_new_tokens=sampling.max_new_tokens)
        _lap(spent, "update_s", clock)
        record = {**parts, **policy.reward_stats(scores_all),
                  **sample_stats(samples_all, kept, group, seen, weights, scores_all),
                  "prompts": state.extra["slot"], "tokens": (step + 1) * s.global_batch * group * s.seq_len}
        return record, {"reward": f"{record['reward_mean']:.3f}", "kept": f"{len(kept)}/{seen['groups']}",
                        "len": f"{record['mean_length']:.0f}", "ent": _shown(record["entropy"]),
                        "gen_tok_s": f"{record['gen_tokens_per_s']:,.0f}"}

    try:
        done = loop.run_steps(ctx, accelerator, objective, optimizer, scheduler, state, steps, one_step)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)

    # 4. The final model, in the plan's precision, with its tokenizer and chat template.
    dtype = pairs.save(ctx, s, objective, done["metrics"])
    last = done["record"]
    keep = ("loss", "reward_mean", "reward_std", "dropped_share", "clip_low", "clip_high", "entropy", "mean_length",
            "truncated_share", "gen_tokens_per_s")
    return {"steps": steps, "prompts": len(pool), "prompts_drawn": state.extra["slot"],
            "epochs": round(order.epochs(state.extra["slot"]), 4), "group_size": group,
            "rewards": sorted(scorers), **{"final_" + k: last.get(k) for k in keep},
            **{k: round(v, 3) for k, v in spent.items()}, "resumed_from_step": done["start"],
            "wall_s": round(done["wall"], 3), "processes": world, "dtype": str(dtype).removeprefix("torch."), **counts}


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): process ``rank``'s contiguous share of ``n`` items, in order; shares differ by at most one
    (the first n mod world processes take one more)."""
    return rank * n // world, (rank + 1) * n // world


def everyone(accelerator, samples: list, scores: dict, seconds: float) -> tuple[list, dict, float]:
    """Every process's samples and reward scores of a round, in slot order (process k holds the k-th
    contiguous share), and the slowest process's generation seconds."""
    if accelerator.num_processes == 1:
        return samples, scores, seconds
    parts = gather_object([(samples, scores, seconds)])
    return ([c for part, _, _ in parts for c in part], {name: [v for _, sc, _ in parts for v in sc[name]] for name in scores},
            max(t for _, _, t in parts))


MAGISTRAL = settings.PRESETS[settings.DEFAULT_PRESET]  # a plan without a setting takes the default preset's


def options(config: dict) -> dict:
    """The step's GRPO settings (the plan's, Magistral's preset for any it lacks), checked."""
    o = {k: config.get(k, v) for k, v in MAGISTRAL.items()}
    if o["epsilon_high"] is None:  # TRL's rule: no epsilon_high clips symmetrically
        o["epsilon_high"] = o["epsilon"]
    if int(o["num_iterations"]) != 1:
        raise ValueError(f"num_iterations {o['num_iterations']}: this runtime makes one update per batch of "
                         f"samples (Magistral's n_batch = n_minibatch); set `num_iterations: 1`")
    if o["loss_type"] not in policy.LOSS_TYPES:
        raise ValueError(f"unknown loss_type {o['loss_type']!r}; expected one of {', '.join(policy.LOSS_TYPES)}")
    if o["scale_rewards"] not in policy.SCALES:
        raise ValueError(f"unknown scale_rewards {o['scale_rewards']!r}; expected one of {', '.join(policy.SCALES)}")
    return {**o, "beta": float(o["beta"]), "epsilon": float(o["epsilon"]), "epsilon_high": float(o["epsilon_high"]),
            "refill_rounds": int(o["refill_rounds"]), "reward_workers": int(o["reward_workers"])}


class TokenLogps(torch.nn.Module):
    """The policy as one module whose forward gives per-token log-probs and entropies
    (`preference.scored_logps`), so Accelerate sees a single forward.

    Scored at the sampling temperature T, softmax(z / T), the distribution the samples were drawn
    from (as TRL does): the policy gradient is then ∇ log π_T. Scored at T = 1 while sampling at
    T ≠ 1, a negative advantage would hand the sampled token's mass out by π_1, which is not the
    distribution the advantage was measured under. The entropy metric is π_T's too; the frozen
    reference (``entropy=False``) is scored at the same T."""

    def __init__(self, model, chunk_tokens: int = 1024, temperature: float = 1.0, entropy: bool = True):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.temperature = temperature
        self.entropy = entropy

    def forward(self, input_ids, attention_mask, loss_mask):
        return scored_logps(self.model, input_ids, attention_mask, loss_mask, chunk_tokens=self.chunk_tokens,
                            entropy=self.entropy, temperature=self.temperature)


def columns(prompts: list) -> dict[str, list]:
    """The records' fields as reward columns, aligned with the completions (TRL's **kwargs)."""
    keys = sorted({k for q in prompts for k in q.columns})
    out = {"answer": [q.answer for q in prompts], "tests": [q.tests for q in prompts],
           "rubric": [q.rubric for q in prompts]}
    out.update({k: [q.columns.get(k) for q in prompts] for k in keys if k not in out})
    return out


def filled(totals: list[float | None], group: int) -> list[float]:
    """None (no reward applied) → the mean of its group's other rewards (0 when none applies)."""
    out = []
    for start in range(0, len(totals), group):
        part = totals[start:start + group]
        known = [v for v in part if v is not None]
        mean = sum(known) / len(known) if known else 0.0
        out += [mean if v is None else float(v) for v in part]
    return out


def matrix(rows, cols, values, shape, device) -> torch.Tensor:
    """[B, T − 1] with ``values`` at (rows, cols), 0 elsewhere (differentiable in ``values``)."""
    out = torch.zeros(shape, dtype=values.dtype, device=device)
    return out.index_put((rows, cols), values)


def update(accelerator, objective, reference, kept: list, group: int, o: dict, *, micro: int, pad_id: int,
           max_new_tokens: int) -> dict:
    """Forward and backward of this process's share of the kept groups (no optimiser step); the
    step's loss and metrics over every process.

    ``kept`` is the step's whole kept list (the same on every process). Advantages and the
    normaliser's weights are computed over all of it first, so neither the cut into micro-batches
    of ``micro`` completions nor the share of each process changes anything (`policy` module
    docstring): the processes' losses sum to one process's loss. Process k trains on the k-th
    contiguous share of the groups (`share`); its loss is multiplied by the number of processes
    because DDP and FSDP average the gradients. Every process runs as many forwards and backwards
    (FSDP gathers each layer from all of them; a sharded reference too): one with fewer
    micro-batches adds copies of the first completion with no weight and no counted token.
    """
    if not kept:
        return {"loss": None, "groups": 0, "clip_low": None, "clip_high": None, "entropy": None, "kl": None}
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    examples = [Example(ids=[*q.ids, *c.ids], mask=[0] * len(q.ids) + [1] * len(c.ids))
                for q, completions, _ in kept for c in completions]
    rewards = torch.tensor([r for _, _, totals in kept for r in totals], dtype=torch.float64)
    adv = policy.advantages(rewards, group, o["scale_rewards"]).to(device)
    finishes = [c.finish for _, completions, _ in kept for c in completions]
    counted = torch.tensor([m[1:] for m in _padded_masks(examples)], dtype=torch.float64)
    if o["mask_truncated_completions"]:
        counted[policy.truncated(finishes)] = 0.0
    weights = policy.sequence_weights(counted, group, o["loss_type"], max_completion_length=max_new_tokens).to(device)
    shares = [share(len(kept), r, world) for r in range(world)]
    lo, hi = (g * group for g in shares[rank])
    calls = max(-(-(b - a) * group // micro) for a, b in shares)  # every process's forward count
    totals = torch.zeros(7, dtype=torch.float64)  # loss, tokens, low, high, kl, entropy, scored
    for m in range(calls):
        start = lo + m * micro
        real = start < hi
        rows = range(start, min(start + micro, hi)) if real else range(1)
        ids, attention, trained = pairs.padded([examples[i] for i in rows], pad_id, device)
        shape = (ids.shape[0], ids.shape[1] - 1)
        mask = counted[rows.start:rows.stop, :shape[1]].to(device) * float(real)
        with pairs.synced(accelerator, objective, m == calls - 1), accelerator.autocast():
            at, cols, logps, entropy = objective(ids, attention, trained)
            ref = None
            if reference is not None:
                with torch.no_grad():
                    ref = matrix(at, cols, reference(ids, attention, trained)[2].float(), shape, device)
                fsdp.reshard(reference)  # a sharded root keeps its gathered weights after forward otherwise
            logp = matrix(at, cols, logps.float(), shape, device)
            parts = policy.token_loss(logp, logp.detach(), adv[rows.start:rows.stop], mask,
                                      weights[rows.start:rows.stop] * float(real), epsilon=o["epsilon"],
                                      epsilon_high=o["epsilon_high"], beta=o["beta"], ref_logps=ref)
            accelerator.backward(parts.loss * world)
        if real:
            totals += torch.tensor([float(parts.loss.detach()), parts.tokens, parts.clipped_low, parts.clipped_high,
                                    parts.kl_sum, float(entropy.sum()), entropy.numel()], dtype=torch.float64)
    if world > 1:
        totals = accelerator.reduce(totals.to(device), "sum").cpu()
    loss, tokens, low, high, kl, entropy, scored = totals.tolist()
    tokens = max(tokens, 1.0)
    return {"loss": loss, "groups": len(kept), "clip_low": low / tokens, "clip_high": high / tokens, "kl": kl / tokens,
            "entropy": entropy / max(scored, 1.0)}


def _shown(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _padded_masks(examples: list[Example]) -> list[list[int]]:
    width = max(len(e.ids) for e in examples)
    return [list(e.mask) + [0] * (width - len(e.mask)) for e in examples]


def sample_stats(samples: list, kept: list, group: int, seen: dict, weights: dict, scores: dict) -> dict:
    """Over every completion generated this step (the dropped groups' too): the weighted reward's mean
    and spread, lengths, the truncated (finish length or loop) and loop shares, generation tok/s;
    the share of groups dropped and the refill rounds beyond the first."""
    totals = [v for v in rewarding.total(scores, weights) if v is not None]
    reward = torch.tensor(totals or [0.0], dtype=torch.float64)
    lengths = torch.tensor([len(c.ids) for c in samples], dtype=torch.float64)
    return {"reward_mean": float(reward.mean()), "reward_std": float(reward.std(unbiased=False)),
            "groups_generated": seen["groups"], "dropped_share": seen["dropped"] / max(seen["groups"], 1),
            "refill_rounds": seen["rounds"] - 1, "mean_length": float(lengths.mean()),
            "truncated_share": sum(c.finish in ("length", "loop") for c in samples) / len(samples),
            "loop_rate": sum(c.looped for c in samples) / len(samples),
            "gen_tokens_per_s": seen["tokens"] / max(seen["generate_s"], 1e-9)}
