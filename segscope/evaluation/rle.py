"""COCO run-length encoding of binary masks, as JSON-ready dicts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util


def masks_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Encode binary masks as COCO compressed RLE.

    Args:
        masks: ``[N, H, W]`` bool (or 0/1 integer) masks, on any device.

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}``; ``counts`` is decoded to ``str`` so the
        list can go straight into ``json.dump`` (pycocotools accepts both ``str`` and ``bytes``).
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [N, H, W], got {tuple(masks.shape)}")
    if len(masks) == 0:
        return []
    # pycocotools wants [H, W, N] uint8 in column-major order.
    encoded = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [
        {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        for rle in encoded
    ]


def rle_to_masks(rles: list[dict[str, Any]]) -> np.ndarray:
    """Decode COCO compressed RLE dicts (``counts`` as ``str`` or ``bytes``) to ``[N, H, W]`` bool."""
    if not rles:
        raise ValueError("rle_to_masks needs at least one RLE (the mask size is unknown otherwise)")
    decoded = mask_util.decode(
        [{"size": r["size"], "counts": _as_bytes(r["counts"])} for r in rles]
    )
    return decoded.transpose(2, 0, 1).astype(bool)


def _as_bytes(counts: str | bytes) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else counts
