"""FSDP2 for the `fsdp` strategy: sharding with `fully_shard`, loading without a full copy per
rank, sharded step checkpoints (`torch.distributed.checkpoint`) and the gathered final save.

Accelerate starts the processes and the process group (`accelerate launch`, docs/runtime.md says
why its FSDP2 plugin is not used); this module owns what FSDP2 changes in the training loop and
must not choose data, losses or schedules.

    rank 0: from_pretrained ──┐                               ┌─ step-N/sharded/  (DCP, every rank)
    rank k: meta device  ─────┴─ fully_shard per layer + root ┤  step-N/rank-K.pt (schedule, data, RNG)
                                 set_model_state_dict(        └─ model/*.safetensors (rank 0 writes,
                                   broadcast_from_rank0)          one gathered tensor at a time)
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..checkpoint import ShardWriter


def strategy(stage: dict) -> str:
    return (stage.get("launch") or {}).get("strategy") or "none"


def rank() -> int:
    """This process's global rank, from the launcher's environment (before any process group)."""
    return int(os.environ.get("RANK", "0"))


def teacher_sharded(stage: dict) -> tuple[bool, str]:
    """Whether the teacher is sharded like the student, and why (written to the log and manifest).

    Replicated only when the plan's memory estimate, which counts a whole teacher per device, fits
    the device memory it was checked against; sharding costs an all-gather per teacher layer per
    micro-batch, replication costs the teacher's size on every device.
    """
    if strategy(stage) != "fsdp":
        return False, "replicated (not an fsdp stage)"
    estimate = stage.get("estimate") or {}
    need, budget = estimate.get("memory_gb"), estimate.get("device_memory_gb")
    if need is not None and budget is not None and need <= budget:
        return False, f"replicated: the plan's estimate with a whole teacher per device, {need:g} GB, fits {budget:g} GB"
    if budget is None:
        return True, "sharded: the plan states no device memory to check a replicated teacher against"
    return True, f"sharded: the plan's estimate with a whole teacher per device, {need:g} GB, exceeds {budget:g} GB"


def empty_on_this_rank(stage: dict, *, teacher: bool = False) -> bool:
    """True where a model is to be built on the meta device: ranks other than 0 of an fsdp stage
    (a replicated teacher is loaded by every rank). Rank 0's weights reach them by broadcast."""
    sharded = teacher_sharded(stage)[0] if teacher else strategy(stage) == "fsdp"
    return sharded and rank() != 0


def init_process_group(device: torch.device) -> bool:
    """`fully_shard` needs a process group; `accelerate launch` made one unless this is a single
    process (a world-size-1 run on one GPU), which gets a private one. True when it made one (the
    caller destroys it when done, so that later in-process stages see no process group)."""
    if dist.is_initialized():
        return False
    device_id = None  # nccl wants the device with its index
    if device.type == "cuda":
        device_id = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    dist.init_process_group("nccl" if device_id is not None else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device_id)
    return True


def policy(compute: str) -> MixedPrecisionPolicy:
    """bf16/fp16 compute on the gathered parameters, gradients reduced in fp32 (the master weights
    and the optimizer stay fp32); fp32 runs change nothing."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (each becomes one FSDP unit): the modules of every ``layers`` ModuleList."""
    return [layer for name, child in module.named_modules() if name.split(".")[-1] == "layers"
            and isinstance(child, torch.nn.ModuleList) for layer in child]


def shard(module: torch.nn.Module, device: torch.device, *, mp: MixedPrecisionPolicy | None = None) -> torch.nn.Module:
    """Shard ``module`` over every process: one unit per decoder layer, the rest in the root unit.

    Rank 0 holds the weights; the other ranks built ``module`` on the meta device. After this
    every rank holds its shard of rank 0's weights, and the buffers (including non-persistent
    ones such as RoPE frequencies) are rank 0's too.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = mp or MixedPrecisionPolicy()
    full = module.state_dict() if dist.get_rank() == 0 else {}
    buffers = dict(module.named_buffers()) if dist.get_rank() == 0 else {}
    for layer in layers(module):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)
    module.to_empty(device=device)
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in module.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)
    return module


def is_sharded(module) -> bool:
    return isinstance(module, FSDPModule)


@torch.no_grad()
def copy_full(sharded: torch.nn.Module, into: torch.nn.Module) -> None:
    """Copy the whole parameters of ``sharded`` into the unsharded module ``into`` (same names; cast
    to its dtype): each parameter gathered in turn, a collective every rank calls in the same order,
    so no rank holds more than one gathered tensor besides ``into``. Buffers are not copied: they
    do not train, and ``into`` was loaded with them."""
    target = dict(into.named_parameters())
    for name, param in sharded.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        target[name].copy_(full)
        del full


def local_params(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds (its shards; whole tensors where not sharded)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def gathered(values) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


@contextmanager
def gradient_sync(module: torch.nn.Module, sync: bool):
    """Reduce-scatter gradients only on the last micro-batch of a step (FSDP2's `no_sync`)."""
    module.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip(module: torch.nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered parameters of a root unit (the root keeps them after forward otherwise)."""
    if isinstance(module, FSDPModule):
        module.reshard()


def save_state(path: Path, model, optimizer, extra: dict) -> None:
    """A step checkpoint: model and optimizer as DCP shards (each rank writes its own), and per
    rank the schedule, data position and RNG states."""
    path.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "sharded"))
    torch.save({**extra, "rng": _rng_state()}, path / f"rank-{dist.get_rank():05d}.pt")


def load_state(path: Path, model, optimizer) -> dict:
    """Restore what `save_state` wrote (same world size); returns the per-rank extras."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = path / f"rank-{dist.get_rank():05d}.pt"
    if not own.exists():
        raise ValueError(f"{path.name} was written by another number of processes (no {own.name}); "
                         "resume it with the world size it was written with")
    extra = torch.load(own, weights_only=False)
    _set_rng_state(extra.pop("rng"))
    return extra


def save_pretrained(model, out_dir: Path, dtype: torch.dtype) -> None:
    """A Hugging Face checkpoint of a sharded model, in ``dtype``: each tensor is gathered in turn
    (a collective, on every rank) and rank 0 streams it into safetensors shards, so no rank ever
    holds more than one whole tensor besides its shards. Tied parameters are written once."""
    main = dist.get_rank() == 0
    writer = ShardWriter(out_dir) if main else None
    if main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if main:
            writer.add(name, full.detach().to(dtype) if full.is_floating_point() else full.detach())
        del full
    if main:
        writer.close()
        save_config(model, out_dir, dtype)
    dist.barrier()


def save_config(model, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json with the weights' ``dtype`` (and generation_config.json where the model has one)."""
    model.config.dtype = dtype
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
