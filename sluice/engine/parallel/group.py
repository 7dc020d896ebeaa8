"""The process group of a parallel engine: rank, world size and the one collective
the forward pass needs (a sum over ranks), a no-op at world size 1.

Ranks find each other through torch.distributed's env:// rendezvous (RANK,
MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU): NCCL on CUDA, gloo on the CPU.
A caller that has set up its own process group keeps it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sluice.engine.errors import ConfigError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    # gloo group for rank 0's calls to the others (parallel/mirror.py), beside the default
    # group the forward pass reduces over (NCCL on GPUs)
    control: Any = field(default=None, compare=False, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place (every rank gets the same tensor back)."""
        if self.world > 1:
            dist.all_reduce(x)
        return x


def join(world_size: int, device: torch.device) -> Group:
    """This process's rank in a group of ``world_size`` (world 1: no group at all)."""
    if world_size == 1:
        return Group()
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"world_size={world_size} runs one process per rank; set {', '.join(missing)} "
                              "(or initialise torch.distributed first)")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", world_size=world_size,
                                rank=int(os.environ["RANK"]))
    if dist.get_world_size() != world_size:
        raise ConfigError(f"world_size={world_size}, but the process group has {dist.get_world_size()} ranks")
    return Group(dist.get_rank(), world_size, dist.new_group(backend="gloo"))


def agree_min(n: int, device: torch.device) -> int:
    """The smallest ``n`` over all ranks (e.g. KV blocks: every rank's scheduler must
    see the same cache size to make the same decisions)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def use_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device when it names one (triton
    launches on the current device: an engine on ``cuda:1`` beside one on ``cuda:0``)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
