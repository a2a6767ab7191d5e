"""The registry of architectures: everything above ``segscope/models`` reaches a model through it.

An ``Architecture`` says how to build a network from its config, how to read that config
back from a file, which tasks it serves, how its raw outputs become per-image predictions,
and how foreign checkpoints convert to it. The pipeline, the trainer, the loader and the
service ask the registry, never which model they hold.

The network contract (in the spirit of torchvision's detection models):
- ``module(images)`` in eval mode returns the raw outputs that ``postprocess`` reads;
- ``module(images, targets)`` in training mode returns a dict of weighted losses (their sum
  is the loss to minimise); targets are the ``segscope.data`` training targets;
- ``module.backbone`` is a ``segscope.models.backbones.Backbone`` (ImageNet initialisation,
  BatchNorm freezing and layer-wise lr decay work on it); ``module.config`` is its config;
- optionally ``module.head_embeddings``, a compiled pattern of the head parameters that BEiT's
  segmentation recipe decays with the patch embedding (``SolverConfig.layer_decay_head_embeddings``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from segscope.errors import CheckpointError, ConfigError
from segscope.predictions import ImageSizes, Prediction

StateDict = dict[str, Tensor]
# A checkpoint format: (read the file, convert its tensors for the target model).
FileFormat = tuple[Callable[[Path], StateDict], Callable[[Mapping[str, Tensor], nn.Module], StateDict]]

TASKS = ("panoptic", "semantic", "instance")


@dataclass(frozen=True)
class Architecture:
    """One architecture, registered once.

    Attributes:
        name: recorded in saved models' headers and configs (``"mask2former"``).
        config_class: its config dataclass; every instance has ``architecture == name`` and
            ``num_classes``.
        config_from_dict: inverse of ``segscope.config.config_to_dict`` for that class.
        build: config -> randomly initialised network (see the module docstring).
        tasks: the tasks ``postprocess`` serves.
        postprocess: ``(config, outputs, sizes, task, threshold, is_thing)`` -> one prediction
            per image of the batch (``sizes``: an ``ImageSizes`` per image), at its original size
            and on the CPU: a ``PanopticPrediction``, ``SemanticPrediction`` (label map and
            confidence, no ``[C,H,W]`` score map) or ``InstancePrediction``
            (``segscope.predictions``). Results computed on a GPU come to the host together
            (``segscope.devices.to_host``), not one sync per image. ``threshold`` is the
            pipeline's (already defaulted by ``default_threshold``); ``is_thing [C]`` bool.
        default_threshold: ``(config, task)`` -> the score threshold a task applies when the
            user gives none (None: the task has no threshold).
        window_scores: ``outputs`` -> semantic class scores ``[B,C,h,w]`` at the network's
            output resolution, for sliding-window inference (the pipeline stitches them and
            takes ``SemanticPrediction.from_scores``); None if it cannot slide.
        file_formats: checkpoint formats its weights come in (``segscope convert --format``),
            each imported only when used.
        example_config: ``num_classes`` -> a small config for tests and examples.
        export_outputs: raw outputs -> the named tensors an exported graph returns
            (``segscope.deploy``); None when the outputs cannot be exported (sizes per image).
    """

    name: str
    config_class: type
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    tasks: tuple[str, ...]
    postprocess: Callable[[Any, Any, Sequence[ImageSizes], str, float | None, Tensor], list[Prediction]]
    default_threshold: Callable[[Any, str], float | None]
    window_scores: Callable[[Any], Tensor] | None
    file_formats: Mapping[str, Callable[[], FileFormat]]
    example_config: Callable[[int], Any]
    export_outputs: Callable[[Any], dict[str, Tensor]] | None = None


# Modules that register the built-in architectures, imported on first use of the registry so
# that importing a light module (the config, say) does not pull in every network.
_BUILTIN = ("segscope.models.mask2former.architecture", "segscope.models.cascade_rcnn.architecture")
_ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    """Add ``architecture``; a second one under the same name is a programming error."""
    if architecture.name in _ARCHITECTURES:
        raise ValueError(f"architecture {architecture.name!r} is registered twice")
    unknown = set(architecture.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"architecture {architecture.name!r} declares unknown tasks {sorted(unknown)}")
    _ARCHITECTURES[architecture.name] = architecture
    return architecture


def _load_builtins() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def architectures() -> dict[str, Architecture]:
    """Every registered architecture by name."""
    _load_builtins()
    return dict(_ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name``; ``CheckpointError`` (it comes from a file) if none is."""
    _load_builtins()
    if name not in _ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {name!r}; segscope has {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


def architecture_of(config: Any) -> Architecture:
    """The architecture a config instance belongs to."""
    _load_builtins()
    for architecture in _ARCHITECTURES.values():
        if isinstance(config, architecture.config_class):
            return architecture
    raise ConfigError(f"{type(config).__name__} is not the config of a registered architecture")


def model_config_from_dict(data: Any) -> Any:
    """An architecture config from its dict (``architecture`` names it; Mask2Former by default,
    as files written before the registry existed hold Mask2Former configs)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a model config is an object, got {str(data)[:100]}")
    return get_architecture(data.get("architecture", "mask2former")).config_from_dict(data)
