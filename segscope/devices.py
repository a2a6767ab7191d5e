"""Turning the ``device`` a user asked for into a usable ``torch.device``, or a clear refusal."""

from __future__ import annotations

import torch

from segscope.errors import OptionError

_KNOWN_TYPES = ("cpu", "cuda", "mps")


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
