"""What an architecture's post-processing returns for one image, whatever the architecture.

The pipeline turns these into ``SegmentationResult``s; every architecture's post-processor
(``segscope.registry.Architecture.postprocess``) returns one of them per image and task:
``PanopticPrediction`` (panoptic), ``SemanticPrediction`` (semantic) or ``InstancePrediction``
(instance), all at the image's original size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict, Union

from torch import Tensor


@dataclass(frozen=True)
class ImageSizes:
    """Where one image sits in the network's input: the ``padded`` batch size ``(Hp, Wp)``, the
    resized image's ``resized`` size in its top-left corner, and its ``original`` size."""

    padded: tuple[int, int]
    resized: tuple[int, int]
    original: tuple[int, int]


class Segment(TypedDict):
    """One panoptic segment: ``id`` in the map (1..N), contiguous class ``label``, ``isthing``,
    ``score`` (the class probability of its query; of its most confident query when merged
    stuff), ``area`` in pixels."""

    id: int
    label: int
    isthing: bool
    score: float
    area: int


@dataclass
class PanopticPrediction:
    """``panoptic_seg [H,W]`` int32 segment ids, 0 = void; ``segments`` in id order."""

    panoptic_seg: Tensor
    segments: list[Segment]


@dataclass
class SemanticPrediction:
    """``labels [H,W]`` int64: each pixel's best class (the first on ties); ``confidence [H,W]``
    float32: that class's share of the pixel's summed class scores, ``max_c s_c / sum_c s_c``."""

    labels: Tensor
    confidence: Tensor

    @classmethod
    def from_scores(cls, scores: Tensor) -> SemanticPrediction:
        """The prediction of class scores ``scores [C,...]`` (non-negative; ``[C,H,W]`` stitched windows, or
        ``[C,N]`` a step of pixels): the first best class and its share of the summed scores."""
        best, labels = scores.max(0)
        return cls(labels=labels, confidence=class_share(best, scores.sum(0)).float())


def class_share(best: Tensor, total: Tensor) -> Tensor:
    """A semantic prediction's confidence: the best class's score over the pixel's summed scores
    (non-negative), a pixel scoring nothing at all giving 0 rather than NaN."""
    return best / total.clamp_min(1e-12)


@dataclass
class InstancePrediction:
    """K instances by descending score: ``masks [K,H,W]`` bool, ``labels [K]`` int64
    contiguous classes, ``scores [K]`` float, ``boxes [K,4]`` float (x0, y0, x1, y1) in pixels,
    the far edges exclusive; an empty mask has the box (0, 0, 0, 0)."""

    masks: Tensor
    labels: Tensor
    scores: Tensor
    boxes: Tensor


Prediction = Union[PanopticPrediction, SemanticPrediction, InstancePrediction]
