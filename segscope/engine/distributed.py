"""Process-group set-up for ``torchrun``; a plain ``python`` run is a world of one."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from segscope.devices import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job and the device it owns."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistributedContext:
    """Join the process group ``torchrun`` describes in the environment, if any.

    NCCL on CUDA, Gloo on CPU; each process takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    use_cuda = chosen.type == "cuda"
    if use_cuda and (world_size > 1 or chosen.index is None):
        # Under torchrun each process owns the GPU of its local rank, whatever index was asked.
        chosen = torch.device("cuda", local_rank)
    if use_cuda:
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        # torch._dynamo (imported by torchvision and the models) holds on, from C++, to every
        # process group that exists when it is first imported: such a group outlives
        # destroy_process_group and is torn down during interpreter exit, where Gloo's threads
        # abort the process ("terminate called without an active exception"). Imported first,
        # it holds none.
        importlib.import_module("torch._dynamo")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, chosen)


def teardown() -> None:
    """Leave the process group, if one was joined, all ranks together.

    The barrier first: a Gloo rank that tears its connections down while a peer is still
    using them (rank 0 writing results after the last collective) can abort the peer. Called
    from a ``finally`` while an exception propagates, it skips the barrier, which a failed
    peer might never reach.
    """
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every process (no-op in a world of one)."""
    if context.is_distributed:
        dist.barrier()
