"""Feature pyramid network (Lin et al. 2017) as mmdetection 2.x's ``FPN`` neck.

Facts (mmdet 2.11 ``mmdet/models/necks/fpn.py``; config ``cascade_mask_rcnn_swin_fpn.py``:
``FPN(in_channels=[128, 256, 512, 1024] for Swin-B, out_channels=256, num_outs=5)``):

- per input level a 1x1 lateral conv and a 3x3 (padding 1) output conv, both with bias and no norm or
  activation (mmcv ``ConvModule`` with ``norm_cfg=None, act_cfg=None``), which names its conv ``conv``:
  checkpoint keys ``neck.lateral_convs.{i}.conv.*`` and ``neck.fpn_convs.{i}.conv.*``;
- top-down: ``lateral[i-1] += interpolate(lateral[i], size=lateral[i-1].shape, mode="nearest")``,
  then the output conv on every merged lateral;
- with ``add_extra_convs=False`` (this config) each extra level is ``max_pool2d(kernel 1, stride 2)``
  of the previous output (torchvision's ``LastLevelMaxPool`` is the same operation); mmdet's
  conv-made extra levels (RetinaNet's ``add_extra_convs``) are not implemented;
- ``init_weights``: ``xavier_init(distribution="uniform")`` on every conv (gain 1, bias 0).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _conv_module(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """A biased conv named ``conv``, as mmcv's ``ConvModule`` without norm and activation."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(OrderedDict(conv=conv))


class FPN(nn.Module):
    """Maps backbone features at strides ``s_0 < s_1 < ...`` to ``num_outs`` maps of ``out_channels``.

    Input ``[B, in_channels[i], H_i, W_i]`` per level; output ``[B, out_channels, H_i, W_i]`` for the
    input levels, then ``num_outs - len(in_channels)`` max-pooled levels (each ``ceil(H / 2)``).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels must be non-empty")
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be at least the number of inputs ({len(in_channels)})")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(_conv_module(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(_conv_module(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``features``: one map per input level, finest first. Returns ``num_outs`` maps, finest first."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(features)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs
