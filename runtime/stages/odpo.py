"""The `odpo` stage: online DPO (Guo et al.'s OAIF, as Ministral 3 runs it) on prompts (`format: prompts`).

Owns the on-policy step and its metrics. Generation is `rollout/generate.py`'s engine, the judge
and its rules `rollout/judges.py`'s, the loss `training/preference.py`'s, batching
`training/pairs.py`'s, optimiser, checkpoints and final save `training/loop.py`'s.

Each step, on every process, for its share of the step's global_batch prompts:

    prompts ─▶ 2 samples each from the current policy (T, top-p of config.generation)
            ─▶ the judge's P(a ≻ b) (`preferences`: a looping or unterminated sample loses,
               <think>…</think> stripped when asked)
            ─▶ the frozen reference's log-probs of both samples (the starting checkpoint)
            ─▶ the soft two-sided DPO loss, β-rescaled ─▶ one optimiser step

Determinism: sample s of the prompt in global slot g (= step × global_batch + j) is drawn with
seed derive(stage seed, "sample", step) and key 2g + s, and the engine makes a sample depend only
on (weights, prompt, sampling, seed, key); the prompt of slot g depends only on g (`pairs.order`).
So a resumed run and a run on two processes draw exactly the samples of one uninterrupted process.

Win rate: a fixed held-out subset of the prompts (`config.win_rate.prompts`, drawn once by the
seed and never trained on) is answered by the reference once, and by the current policy before
the first step, every `win_rate.every_steps` steps and after the last; the win rate is the mean
of the judge's P(policy ≻ reference) over it (the same rules: a looper loses). Always with the
same seeds and keys, so it moves only because the policy does. docs/runtime.md, "Online DPO".
"""

from __future__ import annotations

import time

import torch
from accelerate.utils import gather_object

from cascadec.judging import COMPARE, COMPARE_TEMPERATURE
from cascadec.rewarding import OPTIONS, REWARD_KINDS

from ..context import StageContext
from ..data import chat
from ..data.chat import Example
from ..data.readers import Skips, source_files
from ..rollout.generate import Sampling, engine
from ..rollout.judges import Candidate, RewardJudge, build_judge, preferences
from ..training import fsdp, loop, pairs
from ..training.models import load_model

SPLIT = ("generate_s", "judge_s", "reference_s", "update_s")  # where a step's time goes


def run(ctx: StageContext) -> dict:
    config = ctx.config
    gen = config.get("generation") or {}
    sampling = Sampling(temperature=float(gen.get("temperature", 0.7)), top_p=float(gen.get("top_p", 1.0)),
                        max_new_tokens=int(gen.get("max_new_tokens", 256)), stop=tuple(gen.get("stop") or ()))
    if int(gen.get("samples", 2)) != 2:
        raise ValueError(f"odpo draws 2 samples per prompt (a pair), the plan says generation.samples "
                         f"{gen.get('samples')}; set `generation.samples: 2` on the step")
    win_cfg = config.get("win_rate") or {}
    heldout_n, every = int(win_cfg.get("prompts", 0)), int(win_cfg.get("every_steps", 0))

    # 1. Processes; policy (trained), reference (frozen), judge; the prompts.
    s = pairs.setup(ctx)
    accelerator, tokenizer, seed, steps, micro = s.accelerator, s.tokenizer, s.seed, s.steps, s.micro
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    reference = pairs.frozen(ctx, s, _frozen_dtype(s.compute))
    judge_name, judge_cfg = _the_judge(config)
    judge = build_judge(judge_name, judge_cfg, ctx.inputs.get(f"judge:{judge_name}"), device=device,
                        judges=config.get("judges"), inputs=ctx.inputs)
    strip = bool(config.get("strip_thinking", False))
    pool, heldout, counts = read_prompts(ctx, tokenizer, s.seq_len - sampling.max_new_tokens, heldout_n, seed)
    order = pairs.order(len(pool), seed, bool(config["data"].get("shuffle", True)))
    ctx.log(f"odpo: {len(pool):,} training prompts, {len(heldout)} held out for the win rate "
            f"({counts['dropped']} longer than seq_len − max_new_tokens dropped), judge {judge_name} "
            f"({_described(judge_name, config['judges'])}), {steps} steps of {s.global_batch} prompts")

    # 2. Optimiser, schedule; the engine. It samples from the policy's live weights; under fsdp from a
    #    whole copy on each process (ranks decode different lengths, which sharded weights, gathered
    #    layer by layer in lockstep, cannot), refreshed from the shards before each generation.
    objective, optimizer, scheduler = pairs.prepare(ctx, s)
    policy_engine, refresh, replica = sampler(s, objective)
    state = loop.StepState(win_rate_start=None)
    spent, latest = dict.fromkeys(SPLIT, 0.0), {"win_rate": None}  # latest: the last win rate measured

    def judged(batch: list, a: list, b: list) -> list[float]:
        return preferences(judge, [q.messages for q in batch], [_candidate(c) for c in a],
                           [_candidate(c) for c in b], strip_thinking=strip, columns=[q.fields() for q in batch])

    # 3. The win rate against the starting policy on the held-out prompts (each process a share).
    #    The reference's answers come from the starting weights: the replica before any refresh (a
    #    sharded reference cannot generate, see 2).
    mine = list(range(rank, len(heldout), world))
    with accelerator.autocast():
        baseline = engine(replica if s.sharded else reference.model, tokenizer).generate(
            [heldout[i].ids for i in mine], sampling, seed=pairs.derive(seed, "win-rate", "reference"), keys=mine)

    def win_rate() -> float:
        refresh()
        with accelerator.autocast():
            ours = policy_engine.generate([heldout[i].ids for i in mine], sampling,
                                          seed=pairs.derive(seed, "win-rate", "policy"), keys=mine)
        p = judged([heldout[i] for i in mine], ours, baseline)
        reward_means(judge)  # the rewards of held-out answers are not the step's
        every_p = [v for part in gather_object([p]) for v in part]
        latest["win_rate"] = sum(every_p) / len(every_p)
        return latest["win_rate"]

    def before(start: int) -> dict | None:
        if start == 0 and heldout:
            state.extra["win_rate_start"] = win_rate()
            return {"tokens": 0, "win_rate": state.extra["win_rate_start"]}
        return None

    def after(done: int) -> dict:
        due = heldout and ((every and done % every == 0) or done == steps)
        return {"win_rate": win_rate()} if due else {}

    # 4. One on-policy step.
    def one_step(step: int):
        slots = pairs.my_slots(step, s.global_batch, rank, world)
        batch = [pool[order(g)] for g in slots]
        clock = time.perf_counter()
        refresh()
        with accelerator.autocast():
            samples = policy_engine.generate([q.ids for q in batch for _ in (0, 1)], sampling,
                                             seed=pairs.derive(seed, "sample", step),
                                             keys=[2 * g + k for g in slots for k in (0, 1)])
        a, b = samples[0::2], samples[1::2]
        generating, clock = time.perf_counter() - clock, _lap(spent, "generate_s", clock)
        p = judged(batch, a, b)
        judged_rewards = reward_means(judge)
        clock = _lap(spent, "judge_s", clock)
        ex_a = [_example(q, c) for q, c in zip(batch, a)]
        ex_b = [_example(q, c) for q, c in zip(batch, b)]
        ref = pairs.logps(reference, ex_a + ex_b, pad_id=s.pad_id, device=device, micro=2 * micro,
                          autocast=accelerator.autocast)
        ref_a, ref_b = ref[:len(batch)], ref[len(batch):]
        clock = _lap(spent, "reference_s", clock)
        micros = [pairs.Micro(a=ex_a[k:k + micro], b=ex_b[k:k + micro], ref_a=ref_a[k:k + micro],
                              ref_b=ref_b[k:k + micro], p=torch.tensor(p[k:k + micro], device=device))
                  for k in range(0, s.accum * micro, micro)]
        parts = pairs.update(accelerator, objective, micros, beta=s.beta, weight=s.weight, pad_id=s.pad_id)
        _lap(spent, "update_s", clock)
        record = {**pairs.summary(accelerator, parts, s.beta), **_sample_stats(accelerator, parts, samples, generating),
                  **judged_rewards,
                  "prompts": (step + 1) * s.global_batch,
                  "tokens": (step + 1) * s.global_batch * 2 * s.seq_len}  # the plan's count (windows, not tokens read)
        return record, {"loss": f"{record['loss']:.4f}", "margin": f"{record['margin']:.3f}",
                        "kl": f"{record['kl']:.3f}", "loop": f"{record['loop_rate']:.2f}",
                        "len": f"{record['mean_length']:.0f}", "gen_tok_s": f"{record['gen_tokens_per_s']:,.0f}",
                        **({"win": f"{latest['win_rate']:.2f}"} if latest["win_rate"] is not None else {})}

    done = loop.run_steps(ctx, accelerator, objective, optimizer, scheduler, state, steps, one_step,
                          before=before, after=after)

    # 5. The final model, in the plan's precision, with its tokenizer and chat template.
    dtype = pairs.save(ctx, s, objective, done["metrics"])
    last = done["record"]
    keep = ("loss", "margin", "accuracy", "chosen_logps", "rejected_logps", "kl", "loop_rate", "unterminated_rate",
            "mean_length", "gen_tokens_per_s", "win_rate")
    return {"steps": steps, "prompts": len(pool), "heldout_prompts": len(heldout),
            "prompts_seen": steps * s.global_batch, "epochs": round(order.epochs(steps * s.global_batch), 4),
            "judge": judge_name, "judge_kind": judge_cfg.get("kind"),
            "win_rate_start": state.extra.get("win_rate_start"),
            **{("final_" + k if k != "win_rate" else k): last.get(k) for k in keep},
            **{"final_" + k: v for k, v in last.items() if k.startswith("reward_")},
            **{k: round(v, 3) for k, v in spent.items()}, "resumed_from_step": done["start"],
            "wall_s": round(done["wall"], 3), "processes": world, "dtype": str(dtype).removeprefix("torch."), **counts}


def sampler(s: pairs.Setup, objective):
    """(engine, refresh, replica) for sampling from the policy being trained (odpo and grpo).

    Without fsdp the engine samples from the policy's own live weights. Under fsdp it samples from
    a whole copy on each process, ``replica`` (in `_frozen_dtype`, bf16 on a GPU): ranks decode
    different lengths, which sharded weights, gathered layer by layer in lockstep, cannot serve.
    ``refresh()`` (every process, before each generation) copies the current weights into the
    engine: from the shards one gathered parameter at a time (`fsdp.copy_full`) under fsdp."""
    unwrap = s.accelerator.unwrap_model
    replica = None
    if s.sharded:
        replica = load_model(s.policy_dir, dtype=_frozen_dtype(s.compute)).to(s.accelerator.device)
        replica.eval().requires_grad_(False)
    policy_engine = engine(replica if s.sharded else unwrap(objective).model, s.tokenizer)

    def refresh() -> None:
        if s.sharded:
            fsdp.copy_full(objective.model, replica)
            policy_engine.update(replica)
        else:
            policy_engine.update(unwrap(objective).model)

    return policy_engine, refresh, replica


def read_prompts(ctx: StageContext, tokenizer, longest: int, heldout: int, seed: int) -> tuple[list, list, dict]:
    """(training prompts, held-out prompts, counts): every prompt record of the stage's source that
    leaves room for max_new_tokens in the window; ``heldout`` of them, drawn by the seed, are kept
    for the win rate and never trained on."""
    if longest < 1:
        raise ValueError(f"generation.max_new_tokens leaves no room for a prompt in seq_len {ctx.config['seq_len']}")
    source, skips = ctx.source(), Skips()
    found = [q for _, path in source_files(source) for q in chat.examples(path, source, tokenizer, skips)]
    fitting = [q for q in found if len(q.ids) <= longest]
    if len(fitting) <= heldout:
        raise ValueError(f"data {ctx.config['data']['name']!r} has {len(fitting)} prompts that fit the window "
                         f"(of {len(found)}; a prompt may have at most seq_len − max_new_tokens = {longest} tokens), "
                         f"not more than the {heldout} held out for the win rate")
    drawn = set(torch.randperm(len(fitting), generator=torch.Generator().manual_seed(
        pairs.derive(seed, "heldout")))[:heldout].tolist())
    pool = [q for i, q in enumerate(fitting) if i not in drawn]
    held = [q for i, q in enumerate(fitting) if i in drawn]
    return pool, held, {"dropped": len(found) - len(fitting), "skipped": skips.total}


def _the_judge(config: dict) -> tuple[str, dict]:
    """The stage's pairwise judge: the one entry of ``config.judges`` that is not a reward (a
    compare_rewards judge brings the rewards it totals into ``config.judges`` beside it)."""
    judges = config.get("judges") or {}
    pairwise = {k: v for k, v in judges.items() if v.get("kind") not in REWARD_KINDS}
    if len(pairwise) != 1:
        raise ValueError(f"an odpo stage has one pairwise judge; the plan gives {len(pairwise)} "
                         f"({', '.join(pairwise) or 'none'})")
    return next(iter(pairwise.items()))


def _described(name: str, judges: dict) -> str:
    """The judge's kind, and for compare_rewards the rewards it totals with their weights."""
    config = judges[name]
    if config.get("kind") != COMPARE:
        return config.get("kind")
    parts = [f"{r} ×{judges[r].get('weight', OPTIONS[judges[r]['kind']]['weight']):g}" for r in config["rewards"]]
    return f"{COMPARE} of {', '.join(parts)}, T {config.get('temperature', COMPARE_TEMPERATURE):g}"


def reward_means(judge) -> dict:
    """A compare_rewards judge's rewards since it was last asked: ``reward_<name>``, the mean of each
    over every process's judged answers (None where it never applied); {} for the other judges."""
    if not isinstance(judge, RewardJudge):
        return {}
    every = gather_object([judge.take()])
    out = {}
    for name in judge.rewards:
        values = [v for part in every for v in part[name] if v is not None]
        out[f"reward_{name}"] = sum(values) / len(values) if values else None
    return out


def _frozen_dtype(compute: str):
    """The frozen reference runs in bf16 where the stage trains in bf16 on a GPU, else fp32."""
    return torch.bfloat16 if compute == "bf16" else torch.float32


def _candidate(c) -> Candidate:
    return Candidate(text=c.text, finish=c.finish, looped=c.looped, ids=tuple(c.ids))


def _example(prompt, completion) -> Example:
    """The prompt and its generated completion as one sequence; only the completion is trained."""
    return Example(ids=[*prompt.ids, *completion.ids], mask=[0] * len(prompt.ids) + [1] * len(completion.ids))


def _lap(spent: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    spent[key] += now - since
    return now


def _sample_stats(accelerator, parts: dict, samples: list, seconds: float) -> dict:
    """Over every process's samples: the sequence-level KL to the reference (the mean of
    log π − log π_ref over the samples, which the policy drew: the k1 estimator, up to the
    sampling temperature and top-p), the loop rate, the unterminated rate, the mean completion
    length, and the generation throughput (all processes' tokens over the slowest one's time)."""
    device = accelerator.device
    kl = torch.cat([parts["pi_a"] - parts["ref_a"], parts["pi_b"] - parts["ref_b"]])
    per_sample = torch.tensor([[len(c.ids), float(c.looped), float(c.finish in ("length", "loop"))] for c in samples],
                              device=device)
    kl, per_sample = accelerator.gather(kl), accelerator.gather(per_sample)
    slowest = accelerator.gather(torch.tensor([seconds], device=device, dtype=torch.float64)).max().item()
    return {"kl": kl.mean().item(), "mean_length": per_sample[:, 0].mean().item(),
            "loop_rate": per_sample[:, 1].mean().item(), "unterminated_rate": per_sample[:, 2].mean().item(),
            "gen_tokens_per_s": per_sample[:, 0].sum().item() / max(slowest, 1e-9)}
