"""Foreign checkpoint files -> segscope weights, through the target architecture's formats.

Each architecture lists its formats (``segscope.registry.Architecture.file_formats``): a
reader and a converter that sees the model it converts for (to resize position tables to its
grid). The result is loaded strictly: a file that does not fit is reported key by key.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from segscope.checkpoints.safe_load import StateDict, load_state_dict_strict
from segscope.errors import OptionError
from segscope.registry import architecture_of


def converted_weights(path: str | Path, fmt: str, model: nn.Module) -> StateDict:
    """The weights of the ``fmt`` checkpoint at ``path``, converted and loaded into ``model``
    (a network built from a registered config, kept as ``model.config``).

    Raises ``OptionError`` for a format the model's architecture does not read,
    ``CheckpointError`` for a file that cannot be read or does not fit ``model``.
    """
    architecture = architecture_of(model.config)
    if fmt not in architecture.file_formats:
        raise OptionError(
            f"unknown checkpoint format {fmt!r} for {architecture.name}; "
            f"expected one of {', '.join(architecture.file_formats)}"
        )
    read, convert = architecture.file_formats[fmt]()
    state_dict = convert(read(Path(path)), model)
    load_state_dict_strict(model, state_dict, str(path))
    return state_dict
