"""Splitting inference inputs across ``torchrun`` processes and bringing their records back.

Rank ``r`` of ``W`` takes inputs ``r, r + W, r + 2W, ...``: every input exactly once over the
job, and a balanced share whatever the number of nodes. Process-group set-up stays in
``segscope.engine.distributed``; this module only uses the context it returns.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from segscope.engine.distributed import DistributedContext
from segscope.errors import SegscopeError

T = TypeVar("T")


def shard_indices(length: int, context: DistributedContext) -> range:
    """This process's share of ``length`` items (strided by rank)."""
    return range(context.rank, length, context.world_size)


def gather_to_main(obj: T, context: DistributedContext) -> list[T]:
    """Every process's picklable ``obj`` in rank order on rank 0; ``[]`` on the other ranks.

    ``[obj]`` in a world of one.
    """
    if not context.is_distributed:
        return [obj]
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if gathered is not None else []


def sum_across(values: list[int], context: DistributedContext) -> list[int]:
    """Element-wise sum of integer counters over every process (every rank gets the sums)."""
    if not context.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        tensor = tensor.to(context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [int(v) for v in tensor.cpu()]


def raise_together(error: SegscopeError | None, context: DistributedContext) -> None:
    """Raise on every rank when ``error`` is set on any rank, so that none waits for the others forever.

    A rank whose own check passed raises the first failing rank's error, as an error of the same
    class where that class takes one message.
    """
    if not context.is_distributed:
        if error is not None:
            raise error
        return
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, None if error is None else (type(error), str(error)))
    if error is not None:
        raise error
    failed = next((item for item in gathered if item is not None), None)
    if failed is not None:
        kind, message = failed
        raise kind(f"(on another process) {message}")
