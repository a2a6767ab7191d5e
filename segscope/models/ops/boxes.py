"""Boxes of masks, in the convention used throughout segscope."""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import masks_to_boxes


def mask_boxes(masks: Tensor) -> Tensor:
    """Boxes ``[K,4]`` (x0, y0, x1, y1) float enclosing bool ``masks [K,H,W]``, the far edges
    exclusive; (0, 0, 0, 0) for an empty mask."""
    boxes = masks_to_boxes(masks)
    # masks_to_boxes gives the last covered pixel's index; the box ends on that pixel's far
    # side (detectron2's BitMasks convention), so a one-pixel mask has area 1.
    boxes[:, 2:] += masks.flatten(1).any(1, keepdim=True)
    return boxes
