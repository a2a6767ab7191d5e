"""Batching of training samples for a ``DataLoader``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from segscope.data.transforms import Sample
from segscope.models.ops.boxes import mask_boxes


def collate(samples: Sequence[Sample]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Stack equal-size images; keep targets per image (their counts differ).

    Returns:
        ``images [B, 3, H, W]`` uint8 and, per image, ``{"labels": [N], "masks": [N, H, W],
        "boxes": [N, 4]}``: the masks' enclosing boxes (x0, y0, x1, y1), far edges exclusive,
        computed after augmentation so that they follow crops and flips (box-based
        architectures train on them; mask-based ones ignore them).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    sizes = {tuple(s.image.shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"images of one batch must share a size (crop or pad them first), got {sorted(sizes)}"
        )
    images = torch.stack([s.image for s in samples])
    return images, [{"labels": s.labels, "masks": s.masks, "boxes": mask_boxes(s.masks)} for s in samples]
