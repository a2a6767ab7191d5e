"""Combining evaluator state across ``torch.distributed`` processes.

Each evaluator sees only its process's images; these helpers sum counters or gather result
lists so that every process ends up with the whole dataset's state. They are no-ops when
``torch.distributed`` is not initialized or runs a single process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor across processes, in place."""
    if world_size() == 1:
        return
    # NCCL only reduces CUDA tensors; evaluator counters live on the CPU.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    for tensor in tensors:
        reduced = tensor.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        tensor.copy_(reduced)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
