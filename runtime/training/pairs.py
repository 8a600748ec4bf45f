"""Pairs of completions as training batches, shared by the dpo and odpo stages: which records a
step reads, padding, the log-probs of policy and reference, and one accumulated DPO step.

It must not read data, generate or judge (the stages do); the loss formula is `preference.py`'s.

Loss scaling under accumulation and processes: every pair of a step weighs 1/global_batch,
whatever the micro-batch and the number of processes (each process's micro-batch loss is the
sum of its pairs' losses × processes / global_batch, and DDP averages the processes' gradients),
so the update is the gradient of the step's mean loss: the TRL bug class of posttrain.md §4.6
cannot occur.
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
from . import loop
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
    compute: str  # Accelerate's mixed precision on this machine
    accelerator: object
    model: object  # the policy, on the device, not yet prepared
    tokenizer: object
    pad_id: int

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
    refuse_unsupported(ctx.stage)
    policy_dir = Path(ctx.inputs["policy"])
    global_batch, micro, seed = int(config["global_batch"]), int(config.get("micro_batch") or 1), int(config.get("seed", 0))
    compute = loop.mixed_precision(config.get("precision", "fp32"))
    accelerator = loop.accelerator(ctx, compute)
    set_seed(seed)
    accum = per_process(global_batch, accelerator.num_processes, micro) // micro
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    return Setup(policy_dir=policy_dir, seq_len=int(config["seq_len"]), global_batch=global_batch, micro=micro,
                 accum=accum, steps=int(config["steps"]), beta=float(config["beta"]), seed=seed, compute=compute,
                 accelerator=accelerator, model=load_model(policy_dir).to(accelerator.device), tokenizer=tokenizer,
                 pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def prepare(ctx: StageContext, s: Setup):
    """(objective, optimizer, scheduler): the policy as `SequenceLogps`, prepared by Accelerate."""
    config = ctx.config
    if config.get("activation_checkpointing"):  # recompute each layer in backward (docs/plan.md, Estimates)
        s.model.activation_checkpointing_enable()
    optimizer, scheduler = loop.make_optimizer(s.model, config.get("optimizer") or {}, config.get("schedule") or {},
                                               s.steps)
    objective, optimizer = s.accelerator.prepare(SequenceLogps(s.model).train(), optimizer)
    return objective, optimizer, scheduler


def save(ctx: StageContext, s: Setup, objective, metrics: Path):
    """The trained policy in the plan's precision, with its tokenizer and chat template; its dtype."""
    dtype = loop.save_dtype(ctx.config.get("precision"))
    loop.save_final(ctx, s.accelerator, s.accelerator.unwrap_model(objective).model, dtype, s.tokenizer,
                    s.policy_dir, metrics, chat_template=True)
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
def logps(model, examples: list[Example], *, pad_id: int, device, micro: int, autocast=nullcontext) -> torch.Tensor:
    """Summed completion log-probs [len(examples)] of a frozen ``model``, ``micro`` rows at a time."""
    out = []
    for start in range(0, len(examples), micro):
        with autocast():
            out.append(sequence_logps(model, *padded(examples[start:start + micro], pad_id, device)).float())
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
        last = m == len(micros) - 1
        with (nullcontext() if last else accelerator.no_sync(objective)), accelerator.autocast():
            both = objective(*padded(micro.a + micro.b, pad_id, accelerator.device))
            pi_a, pi_b = both[:len(micro.a)], both[len(micro.a):]
            loss = dpo_loss(pi_a, pi_b, micro.ref_a, micro.ref_b, beta=beta, p=micro.p)
            accelerator.backward(loss.sum() * weight)
        p = micro.p if micro.p is not None else torch.ones_like(micro.ref_a)
        for key, value in (("loss", loss), ("pi_a", pi_a), ("pi_b", pi_b), ("ref_a", micro.ref_a),
                           ("ref_b", micro.ref_b), ("p", p)):
            parts[key].append(value.detach().float().to(accelerator.device))
    return {k: torch.cat(v) for k, v in parts.items()}


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


def refuse_unsupported(stage: dict) -> None:
    """dpo and odpo run in one process or under DDP (`strategy: ddp`): the registry's rule, which the
    executor also applies before a run starts."""
    from ..registry import unrunnable

    if why := unrunnable(stage):
        raise ValueError(why)
