"""Turning the ``device`` a user asked for into a usable ``torch.device``, or a clear refusal;
moving a batch's small inputs to it and its results back without a host sync per tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from segscope.errors import OptionError

_KNOWN_TYPES = ("cpu", "cuda", "mps")

TensorGroup = TypeVar("TensorGroup", bound=tuple)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked against this machine; None picks CUDA when available, else the CPU.

    Raises:
        OptionError: an unparseable name, or a device this machine does not have (CUDA or MPS
            missing, a CUDA index past the last GPU).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise OptionError(f"unknown device {device!r}; expected one of cpu, cuda, cuda:N, mps") from error
    if chosen.type not in _KNOWN_TYPES:
        raise OptionError(f"device {device!r} is not supported; expected one of cpu, cuda, cuda:N, mps")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise OptionError(
                f"device {device!r} was asked for but no CUDA GPU is usable here (torch {torch.__version__}, "
                f"{build}); use --device cpu"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise OptionError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device {device!r} was asked for but MPS is not available here")
    return chosen


def to_host(groups: Sequence[TensorGroup]) -> list[TensorGroup]:
    """``groups`` (tuples or named tuples of tensors) with every tensor on the CPU, after one wait
    for the device for all of them.

    CUDA tensors are copied asynchronously into pinned memory (``non_blocking`` copies to the CPU
    pin their destination), then the current stream is synchronised once: a batch's results
    reach the host with one sync instead of one per tensor. CPU tensors are returned as they are.
    """
    copied = [_same_kind(group, [_async_to_cpu(tensor) for tensor in group]) for group in groups]
    for device in {tensor.device for group in groups for tensor in group if tensor.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()
    return copied


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A small CPU ``tensor`` (indices, scores) on ``device`` without making the host wait: staged
    in pinned memory and copied asynchronously when ``device`` is a GPU."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _same_kind(group: TensorGroup, tensors: list[Tensor]) -> TensorGroup:
    """``tensors`` in a tuple of ``group``'s type (a named tuple takes them as arguments)."""
    return tuple(tensors) if type(group) is tuple else type(group)(*tensors)  # type: ignore[return-value]


def _async_to_cpu(tensor: Tensor) -> Tensor:
    return tensor.to("cpu", non_blocking=tensor.device.type == "cuda")
