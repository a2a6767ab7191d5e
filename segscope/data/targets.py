"""Mask2Former training targets (class indices + binary masks) from label maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def panoptic_targets(
    pan_seg: np.ndarray | Tensor,
    segments_info: Sequence[Mapping[str, Any]],
    id_to_index: Mapping[int, int],
) -> tuple[Tensor, Tensor]:
    """One target per non-crowd segment of a panoptic id map.

    Crowd segments give no target (as in Mask2Former's panoptic dataset mapper): their pixels
    belong to no mask, like VOID.

    Args:
        pan_seg: ``[H, W]`` segment ids.
        segments_info: ``{"id", "category_id", "iscrowd"}`` per segment.
        id_to_index: dataset category id -> contiguous class index.

    Returns:
        ``labels [N]`` int64 class indices and ``masks [N, H, W]`` bool.
    """
    pan_seg = torch.as_tensor(pan_seg).long()
    kept = [s for s in segments_info if not s.get("iscrowd", 0)]
    labels = torch.tensor([id_to_index[s["category_id"]] for s in kept], dtype=torch.int64)
    ids = torch.tensor([s["id"] for s in kept], dtype=torch.int64)
    masks = pan_seg[None] == ids[:, None, None]
    return labels, masks


def semantic_targets(sem_seg: np.ndarray | Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """One target per class present in a semantic label map, ``ignore_index`` left out.

    Args:
        sem_seg: ``[H, W]`` contiguous class indices.

    Returns:
        ``labels [K]`` int64 (ascending) and ``masks [K, H, W]`` bool.
    """
    sem_seg = torch.as_tensor(sem_seg).long()
    labels = torch.unique(sem_seg)
    labels = labels[labels != ignore_index]
    masks = sem_seg[None] == labels[:, None, None]
    return labels, masks
