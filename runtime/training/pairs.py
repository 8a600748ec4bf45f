"""Pairs of completions as training batches, shared by the dpo and odpo stages: which records a
step reads, padding, the log-probs of policy and reference, and one accumulated DPO step.

It must not read data, generate or judge (the stages do); the loss formula is `preference.py`'s.

Loss scaling under accumulation and processes: every pair of a step weighs 1/global_batch,
whatever the micro-batch and the number of processes (each process's micro-batch loss is the
sum of its pairs' losses × processes / global_batch, and DDP averages the processes' gradients),
so the update is the gradient of the step's mean loss: the TRL bug class of posttrain.md §4.6
cannot occur. FSDP's reduce-scatter averages over processes as DDP's all-reduce does.

Under `strategy: fsdp` the policy is sharded as distill's student is (one unit per decoder layer,
rank 0 loads and broadcasts, DCP step checkpoints, a gathered save: `fsdp.py`), and a frozen model
scored on every process is sharded like distill's teacher; every process then runs the same number
of forwards, which `logps` and the stages keep true.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..context import StageContext
from ..data.chat import Example
from ..data.packing import RowOrder
from ..data.stream import per_process
from . import fsdp, loop
from .preference import dpo_loss, sequence_logps


@dataclass
class Setup:
    """What dpo and odpo read from the plan and build first, the same way."""

    policy_dir: Path
    seq_len: int
    global_batch: int
    micro: int  # pairs per forward
    accum: int  # micro-batches per process and step
    steps: int
    beta: float
    seed: int
    compute: str  # the compute precision on this machine ("no", "bf16", "fp16")
    accelerator: object
    model: object  # the policy, on the device (on meta on ranks > 0 under fsdp), not yet prepared
    tokenizer: object
    pad_id: int
    sharded: bool = False  # strategy fsdp
    own_group: bool = False  # a process group made here (a single fsdp process), destroyed by `save`

    @property
    def weight(self) -> float:
        """Each pair's share of the step's loss on this process (see the module docstring)."""
        return self.accelerator.num_processes / self.global_batch


def setup(ctx: StageContext) -> Setup:
    """The processes, the policy (fp32 master weights, from the `policy` input) and its tokenizer."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from .models import load_model

    config = ctx.config
    sharded = fsdp.strategy(ctx.stage) == "fsdp"
    if sharded and config.get("precision") == "fp16":
        raise ValueError("precision fp16 is not supported with strategy fsdp (the compiler refuses it: CSC251); "
                         "use precision bf16")
    policy_dir = Path(ctx.inputs["policy"])
    global_batch, micro, seed = int(config["global_batch"]), int(config.get("micro_batch") or 1), int(config.get("seed", 0))
    compute = loop.mixed_precision(config.get("precision", "fp32"))
    accelerator = loop.accelerator(ctx, "no" if sharded else compute)  # fsdp: its policy casts, not autocast
    own_group = sharded and fsdp.init_process_group(accelerator.device)
    set_seed(seed)
    accum = micro_batches(ctx.stage, global_batch, accelerator.num_processes, micro)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    empty = fsdp.empty_on_this_rank(ctx.stage)
    model = load_model(policy_dir, empty=empty)
    return Setup(policy_dir=policy_dir, seq_len=int(config["seq_len"]), global_batch=global_batch, micro=micro,
                 accum=accum, steps=int(config["steps"]), beta=float(config["beta"]), seed=seed, compute=compute,
                 accelerator=accelerator, model=model if empty else model.to(accelerator.device), tokenizer=tokenizer,
                 pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                 sharded=sharded, own_group=own_group)


def micro_batches(stage: dict, global_batch: int, world: int, micro: int) -> int:
    """Micro-batches per process and step, checked. dpo and odpo: ``micro`` pairs, of the step's
    ``global_batch`` prompts. grpo: ``micro`` completions, of the step's global_batch prompts × G
    samples (a step that drops groups trains on fewer: stages/grpo.py says how they are shared)."""
    if stage.get("kind") != "grpo":
        return per_process(global_batch, world, micro) // micro
    group = int((stage["config"].get("generation") or {}).get("samples", 8))
    completions = global_batch * group
    if completions % (world * micro):
        raise ValueError(f"grpo: global_batch {global_batch} prompts × {group} samples = {completions} completions "
                         f"per step is not a multiple of micro_batch {micro} completions × {world} processes; set "
                         f"micro_batch (completions per forward) so that micro_batch × {world} divides {completions}")
    return completions // (world * micro)


def prepare(ctx: StageContext, s: Setup, wrap=None):
    """(objective, optimizer, scheduler): the policy as ``wrap(model)`` (by default `SequenceLogps`;
    grpo's `TokenLogps`), sharded under fsdp, else prepared by Accelerate."""
    config = ctx.config
    wrap = wrap or SequenceLogps
    if config.get("activation_checkpointing"):  # recompute each layer in backward (docs/plan.md, Estimates)
        s.model.activation_checkpointing_enable()
    opt_cfg, sched_cfg = config.get("optimizer") or {}, config.get("schedule") or {}
    if s.sharded:  # one unit per decoder layer; the optimiser is built on the shards
        objective = fsdp.shard(wrap(s.model).train(), s.accelerator.device, mp=fsdp.policy(s.compute))
        optimizer, scheduler = loop.make_optimizer(objective.model, opt_cfg, sched_cfg, s.steps)
        return objective, optimizer, scheduler
    optimizer, scheduler = loop.make_optimizer(s.model, opt_cfg, sched_cfg, s.steps)
    objective, optimizer = s.accelerator.prepare(wrap(s.model).train(), optimizer)
    return objective, optimizer, scheduler


def frozen(ctx: StageContext, s: Setup, dtype, wrap=None) -> torch.nn.Module:
    """The starting checkpoint, frozen, as a scorer on every process (``wrap(model)``, by default a
    `SequenceLogps`; grpo's scores each token): sharded like distill's teacher under fsdp unless the
    plan's estimate says a whole copy fits (`fsdp.teacher_sharded`), else whole on the device."""
    from .models import load_model

    shard, why = fsdp.teacher_sharded(ctx.stage)
    model = load_model(s.policy_dir, dtype=dtype, empty=fsdp.empty_on_this_rank(ctx.stage, teacher=True))
    scorer = (wrap or SequenceLogps)(model).eval().requires_grad_(False)
    if s.sharded:
        ctx.log(f"{ctx.stage.get('kind')}: reference {why}")
    return fsdp.shard(scorer, s.accelerator.device) if shard else scorer.to(s.accelerator.device)


def save(ctx: StageContext, s: Setup, objective, metrics: Path):
    """The trained policy in the plan's precision, with its tokenizer and chat template; its dtype."""
    dtype = loop.save_dtype(ctx.config.get("precision"))
    if s.sharded:  # every rank takes part in gathering; rank 0 writes
        fsdp.save_pretrained(objective.model, Path(ctx.out) / "model", dtype)
    model = None if s.sharded else s.accelerator.unwrap_model(objective).model
    loop.save_final(ctx, s.accelerator, model, dtype, s.tokenizer, s.policy_dir, metrics, chat_template=True)
    if s.own_group:
        torch.distributed.destroy_process_group()
    return dtype


def derive(seed: int, *parts) -> int:
    """A 63-bit seed from the stage seed and named parts (step, purpose): stable across processes
    and Python runs (no `hash()`, which is salted per process)."""
    text = repr((int(seed), *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def order(n: int, seed: int, shuffle: bool) -> RowOrder:
    """The record read at global slot g = step × global_batch + j: epoch g // n, in a permutation
    of the n records seeded by (seed, epoch) when ``shuffle``, else in file order (sft's packed rows
    are read the same way: `data/packing.py`, `RowOrder`). So a step's records depend only on the
    step (resume reads the same ones) and every record is read once per epoch."""
    if n <= 0:
        raise ValueError("no records to train on")
    return RowOrder(n, n, seed=seed, shuffle=shuffle)


def my_slots(step: int, global_batch: int, process: int, processes: int) -> range:
    """The global slots process ``process`` reads at ``step``: a contiguous share of the step's."""
    share = global_batch // processes
    first = step * global_batch + process * share
    return range(first, first + share)


def truncate(example: Example, seq_len: int) -> Example | None:
    """The first ``seq_len`` tokens (the prompt is kept, a long completion is cut), or None when no
    trained token is left (the prompt alone fills the window)."""
    ids, mask = example.ids[:seq_len], example.mask[:seq_len]
    return Example(ids=ids, mask=[0, *mask[1:]]) if any(mask[1:]) else None


def padded(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, loss_mask [len(examples), longest], right-padded."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    trained = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        attention[row, :len(e.ids)] = 1
        trained[row, :len(e.mask)] = torch.tensor(e.mask)
    return ids.to(device), attention.to(device), trained.to(device)


class SequenceLogps(torch.nn.Module):
    """The policy as one module whose forward is `sequence_logps`, so DDP sees a single forward."""

    def __init__(self, model, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, attention_mask, loss_mask):
        return sequence_logps(self.model, input_ids, attention_mask, loss_mask, chunk_tokens=self.chunk_tokens)


@torch.no_grad()
def logps(scorer: SequenceLogps, examples: list[Example], *, pad_id: int, device, micro: int,
          autocast=nullcontext) -> torch.Tensor:
    """Summed completion log-probs [len(examples)] of a frozen ``scorer``, ``micro`` rows at a time
    (a sharded scorer: every process must pass as many micro-batches)."""
    out = []
    for start in range(0, len(examples), micro):
        with autocast():
            out.append(scorer(*padded(examples[start:start + micro], pad_id, device)).float())
        fsdp.reshard(scorer)  # a sharded root keeps its gathered weights after forward otherwise
    return torch.cat(out) if out else torch.zeros(0, device=device)


@dataclass
class Micro:
    """One micro-batch of pairs: completions a and b, the reference's log-probs, P(a ≻ b) (None: a
    is the chosen answer, sigmoid DPO)."""

    a: list[Example]
    b: list[Example]
    ref_a: torch.Tensor
    ref_b: torch.Tensor
    p: torch.Tensor | None = None


def update(accelerator, objective, micros: list[Micro], *, beta: float, weight: float, pad_id: int) -> dict:
    """Forward and backward of one step's micro-batches (no optimiser step); per-pair tensors.

    ``weight`` multiplies each pair's loss (processes / global_batch, see the module docstring).
    The DDP gradient all-reduce runs once, after the last micro-batch.
    """
    parts: dict[str, list] = {k: [] for k in ("loss", "pi_a", "pi_b", "ref_a", "ref_b", "p")}
    for m, micro in enumerate(micros):
        with synced(accelerator, objective, m == len(micros) - 1), accelerator.autocast():
            both = objective(*padded(micro.a + micro.b, pad_id, accelerator.device))
            pi_a, pi_b = both[:len(micro.a)], both[len(micro.a):]
            loss = dpo_loss(pi_a, pi_b, micro.ref_a, micro.ref_b, beta=beta, p=micro.p)
            accelerator.backward(loss.sum() * weight)
        p = micro.p if micro.p is not None else torch.ones_like(micro.ref_a)
        for key, value in (("loss", loss), ("pi_a", pi_a), ("pi_b", pi_b), ("ref_a", micro.ref_a),
                           ("ref_b", micro.ref_b), ("p", p)):
            parts[key].append(value.detach().float().to(accelerator.device))
    return {k: torch.cat(v) for k, v in parts.items()}


def synced(accelerator, objective, last: bool):
    """The context of one micro-batch's forward and backward: the gradients are reduced across
    processes (DDP's all-reduce, FSDP's reduce-scatter) only on the step's ``last`` micro-batch."""
    if fsdp.is_sharded(objective):
        return fsdp.gradient_sync(objective, last)
    return nullcontext() if last else accelerator.no_sync(objective)


def summary(accelerator, parts: dict, beta: float) -> dict:
    """Step metrics over every process's pairs: the loss, the chosen answer's (p ≥ ½) and the
    rejected one's log-probs, the reward margin β·Δ(chosen − rejected) and how often it is > 0."""
    every = {k: accelerator.gather(v) for k, v in parts.items()}
    a_wins = every["p"] >= 0.5
    chosen = torch.where(a_wins, every["pi_a"], every["pi_b"])
    rejected = torch.where(a_wins, every["pi_b"], every["pi_a"])
    chosen_ref = torch.where(a_wins, every["ref_a"], every["ref_b"])
    rejected_ref = torch.where(a_wins, every["ref_b"], every["ref_a"])
    margin = beta * ((chosen - chosen_ref) - (rejected - rejected_ref))
    return {"loss": every["loss"].mean().item(), "margin": margin.mean().item(),
            "accuracy": (margin > 0).float().mean().item(), "chosen_logps": chosen.mean().item(),
            "rejected_logps": rejected.mean().item()}
