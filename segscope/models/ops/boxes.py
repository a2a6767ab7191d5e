"""Boxes of masks, in the convention used throughout segscope."""

from __future__ import annotations

import torch
from torch import Tensor


def mask_boxes(masks: Tensor) -> Tensor:
    """Boxes ``[K,4]`` (x0, y0, x1, y1) float enclosing bool ``masks [K,H,W]``, the far edges
    exclusive (detectron2's BitMasks convention: a one-pixel mask has area 1); (0, 0, 0, 0) for
    an empty mask.

    By hand rather than torchvision's ``masks_to_boxes``, which zeroes empty masks through a
    boolean index: on a GPU that reads the mask count back to the host, a sync per call.
    """
    y0, y1 = _extent(masks.any(2))
    x0, x1 = _extent(masks.any(1))
    present = masks.flatten(1).any(1, keepdim=True)
    return torch.stack([x0, y0, x1, y1], dim=1).float() * present


def _extent(covered: Tensor) -> tuple[Tensor, Tensor]:
    """First covered index and one past the last, ``[K]`` each, of bool ``covered [K,L]`` (any values when none)."""
    length = covered.shape[1]
    as_int = covered.to(torch.uint8)
    # argmax returns the first maximum: the first covered index, and from the end the last one.
    return as_int.argmax(1), length - as_int.flip(1).argmax(1)
