"""Foreign checkpoint files -> segscope weights, one reader and one converter per format.

Every converter sees the model it converts for (to resize position tables to its grid), and
the result is loaded strictly: a file that does not fit is reported key by key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn

from segscope.checkpoints.safe_load import StateDict, load_state_dict_strict
from segscope.errors import OptionError

Reader = Callable[[Path], StateDict]
Converter = Callable[[Mapping[str, Tensor], nn.Module], StateDict]


def _detectron2() -> tuple[Reader, Converter]:
    from segscope.checkpoints.detectron2 import convert_detectron2_mask2former, read_detectron2_pickle

    return read_detectron2_pickle, lambda state_dict, model: convert_detectron2_mask2former(state_dict)


def _mmlab(fmt: str) -> Callable[[], tuple[Reader, Converter]]:
    def formats() -> tuple[Reader, Converter]:
        from segscope.checkpoints.mmlab import MMLAB_CONVERTERS, read_mmlab_checkpoint

        return read_mmlab_checkpoint, MMLAB_CONVERTERS[fmt]

    return formats


# Format name -> (reader, converter), imported only when used.
FILE_FORMATS: dict[str, Callable[[], tuple[Reader, Converter]]] = {
    "detectron2": _detectron2,
    "mmseg0": _mmlab("mmseg0"),
    "mmseg1": _mmlab("mmseg1"),
    "mmdet2": _mmlab("mmdet2"),
    "mmdet3": _mmlab("mmdet3"),
}


def converted_weights(path: str | Path, fmt: str, model: nn.Module) -> StateDict:
    """The weights of the ``fmt`` checkpoint at ``path``, converted and loaded into ``model``.

    Raises ``OptionError`` for an unknown format, ``CheckpointError`` for a file that cannot
    be read or does not fit ``model``.
    """
    if fmt not in FILE_FORMATS:
        raise OptionError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FILE_FORMATS)}")
    read, convert = FILE_FORMATS[fmt]()
    state_dict = convert(read(Path(path)), model)
    load_state_dict_strict(model, state_dict, str(path))
    return state_dict
