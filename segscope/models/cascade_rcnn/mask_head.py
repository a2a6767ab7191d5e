"""Mask branch of Cascade Mask R-CNN, as mmdetection 2.x's ``FCNMaskHead``: head, targets, loss, pasting.

Facts (mmdet 2.11, as shipped by the Swin Transformer detection project: ``mmdet/models/roi_heads/
mask_heads/fcn_mask_head.py``, ``mmdet/core/mask/mask_target.py``, ``mmdet/core/mask/structures.py``
(``BitmapMasks.crop_and_resize``), ``mmdet/models/losses/cross_entropy_loss.py`` (``mask_cross_entropy``);
settings from ``configs/_base_/models/cascade_mask_rcnn_swin_fpn.py``):

- head: ``num_convs=4`` mmcv ``ConvModule`` 3x3 (padding 1, bias, no norm) + ReLU, 256 channels
  (``convs.i.conv``); ``upsample``: ``ConvTranspose2d(256, 256, 2, stride=2)`` + ReLU; ``conv_logits``:
  1x1 to ``num_classes`` channels (not class-agnostic). Input: 14x14 RoI features; output 28x28 logits.
  Init: the ConvModule convs by mmcv's ``kaiming_init`` (normal, ``fan_out``, relu gain, bias 0);
  ``upsample`` and ``conv_logits`` by ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, bias 0.
- targets (``mask_target_single``): each positive box is clipped to ``[0, W] x [0, H]`` of its gt mask
  bitmap; the bitmap of its assigned gt is cut out and resized by mmcv ``roi_align(mask, rois, 28, 1.0,
  0, 'avg', aligned=True)`` (spatial scale 1, adaptive sampling) and binarised ``>= 0.5``.
- loss (``mask_cross_entropy``): the logits of each RoI's gt-class channel, binary cross-entropy with
  the targets, mean over all RoIs and pixels; loss weight 1 (times the cascade stage's weight).
- pasting (``get_seg_masks`` / ``_do_paste_mask``): each mask is resampled into the whole image by
  ``F.grid_sample(align_corners=False)`` with pixel centres ``(x + 0.5 - x0) / (x1 - x0) * 2 - 1`` (zero
  padding outside the box), then thresholded ``>= mask_thr_binary = 0.5``. With ``rescale=True`` the
  boxes are divided by the resize factor first and pasted at the original image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, roi_align


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` as used here: ``conv`` (bias only without norm), optional ``bn``, ReLU.

    Attribute names follow mmcv (``conv``, ``bn``) so that mmdet checkpoints load as they are.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, with_norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not with_norm)
        self.bn = nn.BatchNorm2d(out_channels) if with_norm else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[N,C_in,H,W]`` -> ``[N,C_out,H,W]``."""
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x)


class FCNMaskHead(nn.Module):
    """Four 3x3 convs, a 2x deconvolution and per-class 1x1 mask logits."""

    def __init__(
        self, num_classes: int = 80, in_channels: int = 256, conv_out_channels: int = 256, num_convs: int = 4
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels) for i in range(num_convs)
        )
        last = conv_out_channels if num_convs > 0 else in_channels
        self.upsample = nn.ConvTranspose2d(last, conv_out_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        """RoI features ``[N,C,S,S]`` -> mask logits ``[N,num_classes,2S,2S]``."""
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


@torch.no_grad()
def mask_targets(boxes: Tensor, gt_masks: Tensor, gt_inds: Tensor, mask_size: int = 28) -> Tensor:
    """Binary targets ``[P,S,S]`` (float) of the boxes ``[P,4]`` cut from their gts' bitmaps ``gt_masks [G,H,W]``.

    ``gt_inds [P]`` names each box's gt; boxes are clipped to the bitmap first (mmdet's rule, above).
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0, mask_size, mask_size)
    clipped = clip_boxes_to_image(boxes, tuple(gt_masks.shape[-2:]))
    rois = torch.cat([gt_inds[:, None].to(boxes.dtype), clipped], dim=1)
    resized = roi_align(gt_masks[:, None].to(boxes.dtype), rois, mask_size, 1.0, 0, aligned=True)
    return (resized[:, 0] >= 0.5).to(boxes.dtype)


def mask_loss(logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of the gt-class channel of ``logits [P,C,S,S]`` against ``targets [P,S,S]``.

    ``labels [P]``: the gt class of each RoI. With no RoI the loss is a zero that keeps the graph.
    """
    if logits.shape[0] == 0:
        return logits.sum()
    chosen = logits[torch.arange(logits.shape[0], device=logits.device), labels]
    return F.binary_cross_entropy_with_logits(chosen.float(), targets.float())


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Paste mask probabilities ``[K,h,w]`` into their ``boxes [K,4]`` on a ``(H, W)`` canvas -> bool ``[K,H,W]``.

    ``boxes`` must already be in the canvas's pixels (divide network-input boxes by the resize factor to
    paste at the original image size). mmdet's ``_do_paste_mask``: ``grid_sample`` over every pixel centre.
    """
    height, width = image_size
    if masks.shape[0] == 0:
        return torch.zeros(0, height, width, dtype=torch.bool, device=masks.device)
    x0, y0, x1, y1 = boxes.float().split(1, dim=1)  # each [K,1]
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    grid_y, grid_x = (ys - y0) / (y1 - y0) * 2 - 1, (xs - x0) / (x1 - x0) * 2 - 1
    # A zero-width or zero-height box divides by zero: mmdet sets the infinite coordinates to 0.
    grid_y = torch.where(grid_y.isinf(), torch.zeros_like(grid_y), grid_y)
    grid_x = torch.where(grid_x.isinf(), torch.zeros_like(grid_x), grid_x)
    num = masks.shape[0]
    grid = torch.stack(
        [grid_x[:, None, :].expand(num, height, width), grid_y[:, :, None].expand(num, height, width)], dim=3
    )
    pasted = F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0]
    return pasted >= threshold
