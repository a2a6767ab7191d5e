"""Box regression deltas of mmdetection 2.x's ``DeltaXYWHBBoxCoder``.

Facts (mmdet 2.11 ``mmdet/core/bbox/coder/delta_xywh_bbox_coder.py``):

- boxes are x0y0x1y1; width is ``x1 - x0`` with no ``+ 1`` (mmdet 1.x added one), the centre is
  ``(x0 + x1) / 2``;
- ``encode``: ``((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph))``, then ``(d - means) / stds``;
- ``decode``: ``d * stds + means``; ``dw`` and ``dh`` are clamped to ``[-r, r]`` with
  ``r = |log(wh_ratio_clip)|``, ``wh_ratio_clip = 16 / 1000`` (torchvision clamps only from above);
  when the image size is given, x is clipped to ``[0, W]`` and y to ``[0, H]`` (no ``- 1``);
- the RPN uses means 0 and stds 1; the cascade's three box heads use stds
  ``(0.1, 0.1, 0.2, 0.2)``, ``(0.05, 0.05, 0.1, 0.1)``, ``(0.033, 0.033, 0.067, 0.067)``.

torchvision's ``BoxCoder(weights)`` is the same transform with ``weights = 1 / stds`` and means 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image


class DeltaXYWHBBoxCoder:
    """Encodes boxes as normalised (dx, dy, dw, dh) deltas from reference boxes, and back."""

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise ValueError("means and stds need 4 values each")
        if min(stds) <= 0:
            raise ValueError(f"stds must be positive, got {tuple(stds)}")
        if not 0 < wh_ratio_clip < 1:
            raise ValueError(f"wh_ratio_clip must lie in (0, 1), got {wh_ratio_clip}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_log_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """Deltas ``[N,4]`` that move reference ``boxes [N,4]`` onto ``gt_boxes [N,4]``."""
        if boxes.shape != gt_boxes.shape or boxes.shape[-1] != 4:
            raise ValueError(f"boxes {tuple(boxes.shape)} and gt_boxes {tuple(gt_boxes.shape)} must both be [N,4]")
        pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        px, py = (boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5
        gw, gh = gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1]
        gx, gy = (gt_boxes[:, 0] + gt_boxes[:, 2]) * 0.5, (gt_boxes[:, 1] + gt_boxes[:, 3]) * 0.5
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """Apply ``deltas [N,4k]`` (k boxes per reference, e.g. one per class) to ``boxes [N,4]``.

        Returns ``[N,4k]`` x0y0x1y1 boxes, clipped to ``max_shape = (H, W)`` when given.
        """
        num = boxes.shape[0]
        if deltas.shape[0] != num or deltas.shape[-1] % 4 != 0 or deltas.dim() != 2:
            raise ValueError(f"deltas {tuple(deltas.shape)} must be [N,4k] for boxes {tuple(boxes.shape)}")
        d = deltas.view(num, deltas.shape[1] // 4, 4) * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy = d[..., 0], d[..., 1]
        dw = d[..., 2].clamp(-self.max_log_ratio, self.max_log_ratio)
        dh = d[..., 3].clamp(-self.max_log_ratio, self.max_log_ratio)
        px = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None]
        py = ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        pw = (boxes[:, 2] - boxes[:, 0])[:, None]
        ph = (boxes[:, 3] - boxes[:, 1])[:, None]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = px + pw * dx, py + ph * dy
        decoded = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)
        if max_shape is not None:
            decoded = clip_boxes_to_image(decoded, max_shape)
        return decoded.reshape(num, deltas.shape[1])
