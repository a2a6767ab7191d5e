"""segscope: panoptic, semantic and instance segmentation on CPU and GPU.

    >>> import segscope
    >>> segment = segscope.pipeline("image-segmentation", model="demo")
    >>> result = segment("street.jpg")
    >>> result["masks"].shape, result["labels"][:3]
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from segscope.loading import LoadedModel, load
from segscope.pipeline import SegmentationPipeline, pipeline
from segscope.results import SegmentationResult
from segscope.zoo import list_models

__version__ = "0.1.0"


def load_model(model: str | os.PathLike[str]) -> nn.Module:
    """The network behind ``model`` (zoo name, Hub id, directory or checkpoint), in eval mode.

    Its forward takes a normalized ``[B,3,H,W]`` tensor and returns its architecture's raw
    outputs (for Mask2Former ``class_logits [B,Q,C+1]`` and ``mask_logits [B,Q,H/4,W/4]``);
    ``segscope.registry`` says how each architecture's outputs become predictions.
    """
    return load(model).module


def __getattr__(name: str) -> Any:
    """``segscope.Trainer`` and ``segscope.TrainConfig``, imported on first use (training pulls
    in the data and engine modules, which inference does not need)."""
    if name == "Trainer":
        from segscope.engine.trainer import Trainer

        return Trainer
    if name == "TrainConfig":
        from segscope.engine.train_config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'segscope' has no attribute {name!r}")


__all__ = [
    "LoadedModel",
    "SegmentationPipeline",
    "SegmentationResult",
    "TrainConfig",
    "Trainer",
    "list_models",
    "load_model",
    "pipeline",
    "__version__",
]
