"""Multi-process training through torchrun and torch.distributed.

`torchrun --nproc_per_node=N -m minigpt.train ...` starts N copies of the trainer with
RANK / WORLD_SIZE / LOCAL_RANK set; `init_distributed` joins them into one process group
(NCCL on CUDA, gloo on the CPU). Nothing here launches processes or reduces tensors by hand:
DistributedDataParallel and FSDP do the gradient work, torchrun the launching.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .device import resolve_device
from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """This process's place as torchrun's environment variables give it."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one; return this rank's place and device.

    One device per local rank: `cuda:LOCAL_RANK` with NCCL when CUDA is used, the CPU with
    gloo otherwise. The timeout bounds how long a collective waits for a rank that died.
    """
    info = DistInfo.from_env()
    if not info.enabled:
        return info, resolve_device(device)
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        wanted = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(wanted)
        backend = "nccl"
    elif wanted.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"distributed training supports CUDA and CPU devices, not {wanted}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return info, wanted


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """DistributedDataParallel (a full copy per rank), or FSDP (parameters, gradients and
    optimizer state sharded across ranks, for models that do not fit one device)."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # Shard each block separately so that only one block's full weights exist at a time.
        for block in model.trf_blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(wrapped: nn.Module, info: DistInfo, fsdp: bool,
                  enabled: bool) -> contextlib.AbstractContextManager:
    """A context for one micro-batch's backward pass: `enabled=False` skips the gradient
    all-reduce (on all but the last micro-batch of a step)."""
    if fsdp:
        wrapped.set_requires_gradient_sync(enabled)
    elif info.enabled and not enabled:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on the CPU, the optimizer's keyed by parameter
    name, so that a checkpoint loads the same way with or without DDP/FSDP (a collective
    under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load an optimizer state saved by `full_state` into this rank's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if fsdp else None
    set_optimizer_state_dict(model, optimizer, state, options=options)
