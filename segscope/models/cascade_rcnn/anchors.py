"""Anchor boxes of the region proposal network, as mmdetection 2.x's ``AnchorGenerator`` makes them.

Facts (mmdet 2.11 ``mmdet/core/anchor/anchor_generator.py``, the version the Swin Transformer detection
project ships; config ``configs/_base_/models/cascade_mask_rcnn_swin_fpn.py``):

- the RPN uses ``scales=[8]``, ``ratios=[0.5, 1.0, 2.0]``, ``strides=[4, 8, 16, 32, 64]``; the base size of
  a level is its stride, ``center_offset`` is 0, so the base anchors of a level are centred on (0, 0);
- a ratio is height / width: ``h = base * scale * sqrt(ratio)``, ``w = base * scale / sqrt(ratio)``,
  computed in float32 and **not rounded** (torchvision rounds its cell anchors);
- ``scale_major=True``: the base anchors of a level run over ratios, and over scales within a ratio;
- ``grid_anchors`` shifts the base anchors to ``(x * stride, y * stride)`` for every cell of the
  feature map and flattens them as ``(y, x, anchor)`` row-major, the anchor index fastest, which is
  the order of ``objectness.permute(0, 2, 3, 1).reshape(B, -1)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """Anchors of every level of a feature pyramid, cached per set of feature-map sizes."""

    def __init__(
        self,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales: Sequence[float] = (8.0,),
        center_offset: float = 0.0,
        cache_size: int = 8,
    ) -> None:
        if not 0.0 <= center_offset <= 1.0:
            raise ValueError(f"center_offset must lie in [0, 1], got {center_offset}")
        if not strides or not ratios or not scales:
            raise ValueError("strides, ratios and scales must be non-empty")
        self.strides = tuple(int(s) for s in strides)
        self.center_offset = center_offset
        self.base_anchors = [self._base_anchors(s, ratios, scales) for s in self.strides]
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple, list[Tensor]] = OrderedDict()

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per feature-map cell (the same on every level)."""
        return self.base_anchors[0].shape[0]

    def _base_anchors(self, base_size: int, ratios: Sequence[float], scales: Sequence[float]) -> Tensor:
        """``[len(ratios) * len(scales), 4]`` x0y0x1y1 anchors of one cell, ratio-major, float32."""
        h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        scales_t = torch.tensor(scales, dtype=torch.float32)
        ws = (base_size * w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (base_size * h_ratios[:, None] * scales_t[None, :]).view(-1)
        cx = cy = self.center_offset * base_size
        return torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)

    def grid_anchors(
        self, feature_sizes: Sequence[tuple[int, int]], device: torch.device | str = "cpu"
    ) -> list[Tensor]:
        """Anchors of every level: ``[H_l * W_l * A, 4]`` float32 x0y0x1y1, ordered ``(y, x, anchor)``.

        ``feature_sizes`` holds ``(H_l, W_l)`` per level. The result is cached (a few entries, least
        recently used dropped first) and must not be modified in place.
        """
        if len(feature_sizes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature sizes, got {len(feature_sizes)}")
        device = torch.device(device)
        key = (tuple((int(h), int(w)) for h, w in feature_sizes), device)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        anchors = [
            self._level_anchors(base, stride, size, device)
            for base, stride, size in zip(self.base_anchors, self.strides, key[0])
        ]
        self._cache[key] = anchors
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return anchors

    @staticmethod
    def _level_anchors(base: Tensor, stride: int, size: tuple[int, int], device: torch.device) -> Tensor:
        """``base [A,4]`` shifted over an ``(H, W)`` grid of the given stride: ``[H * W * A, 4]``."""
        height, width = size
        shift_x = torch.arange(width, device=device) * stride
        shift_y = torch.arange(height, device=device) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4).to(torch.float32)
        return (shifts + base.to(device)[None]).reshape(-1, 4)
