"""COCO panoptic PNGs: segment ids stored as RGB colours, id = R + 256 G + 256^2 B."""

from __future__ import annotations

import numpy as np


def id_to_rgb(pan_seg: np.ndarray) -> np.ndarray:
    """``[H, W]`` segment ids (< 256^3) as the ``[H, W, 3]`` uint8 colours of a panoptic PNG."""
    pan_seg = np.asarray(pan_seg, dtype=np.int64)
    return np.stack([pan_seg % 256, pan_seg // 256 % 256, pan_seg // 256**2], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Inverse of ``id_to_rgb``: ``[H, W, 3]`` colours to ``[H, W]`` int64 segment ids."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
