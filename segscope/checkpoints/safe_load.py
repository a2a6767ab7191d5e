"""Reading weight files without executing pickled code, and loading them strictly.

Only two ways in: safetensors, and ``torch.load(weights_only=True)``, whose unpickler refuses
anything but tensors and plain containers. A checkpoint that does not fit the model is
reported by key, never half-loaded.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from segscope.errors import CheckpointError, InputNotFoundError

StateDict = dict[str, torch.Tensor]

# How many offending keys an error message lists before summarising the rest.
_KEYS_SHOWN = 10


def read_weights(path: str | Path, *, opaque_metadata: bool = False) -> StateDict:
    """Read a ``.safetensors`` file or a torch checkpoint holding tensors.

    A torch checkpoint may be a bare state dict or wrap one under ``"model"`` or
    ``"state_dict"`` (trainer checkpoints). Raises ``CheckpointError`` for a missing,
    truncated or unsafe file. ``opaque_metadata``: see ``read_torch_file``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error
    payload = read_torch_file(path, opaque_metadata=opaque_metadata)
    return extract_state_dict(payload, path)


class OpaqueObject:
    """Stands in for an object of a class segscope will not import: it takes any arguments
    and state and does nothing with them, so nothing of the original class ever runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        del state


def _opaque_globals(path: Path) -> list[Any]:
    """What a weights-only load of ``path`` needs beyond tensors: numpy's array and scalar
    builders (data, not code) as themselves, any other class or function as an inert
    ``OpaqueObject`` subclass of the same name."""
    import numpy as np

    from segscope.checkpoints.detectron2 import numpy_globals

    numpy_builders = numpy_globals()
    allowed: list[Any] = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        module, _, attribute = name.rpartition(".")
        builder = numpy_builders.get((module, attribute))
        allowed.append((builder or type(attribute, (OpaqueObject,), {}), name))
    return allowed


def read_torch_file(path: Path, *, opaque_metadata: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``, errors turned into ``CheckpointError``.

    ``opaque_metadata``: training frameworks (mmcv/mmengine) store their own objects (log
    buffers, numpy scores) next to the weights. Rather than refuse such a file, replace every
    class or function it names by an inert ``OpaqueObject`` (torch still refuses the modules
    it blocks outright, such as ``os``); a state dict made of anything but tensors is then
    refused by ``extract_state_dict``.
    """
    try:
        if opaque_metadata and zipfile.is_zipfile(path):
            with torch.serialization.safe_globals(_opaque_globals(path)):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain "
            f"containers, and segscope never runs arbitrary pickled code ({error})"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"cannot read {path} (truncated or not a checkpoint?): {error}") from error


def extract_state_dict(payload: Any, source: str | Path) -> StateDict:
    """The tensors of a loaded checkpoint, unwrapping ``{"model" | "state_dict" | "module": ...}``
    (trainers; BEiTv2's releases keep DDP's ``module``)."""
    if isinstance(payload, Mapping):
        for wrapper in ("model", "state_dict", "module"):
            inner = payload.get(wrapper)
            if isinstance(inner, Mapping):
                payload = inner
                break
    if not isinstance(payload, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()
    ):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    return dict(payload)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every tensor of ``state_dict`` into ``model``, or raise naming what does not fit.

    Missing keys, unexpected keys and shape mismatches are all collected first, so one error
    tells the whole story.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:_KEYS_SHOWN])
            more = f" (+{len(items) - _KEYS_SHOWN} more)" if len(items) > _KEYS_SHOWN else ""
            problems.append(f"{title} keys [{len(items)}]: {shown}{more}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(dict(state_dict), strict=True)
