"""ResNet backbone (torchvision's layout: the stride sits in the 3x3 convolution).

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``), which HF's
``ResNetBackbone`` with ``downsample_in_bottleneck=False`` and detectron2's
``STRIDE_IN_1X1=False`` R50 map onto by renaming alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.models import resnet

from segscope.config import ResNetConfig
from segscope.models.backbones.base import Backbone

_ARCHITECTURES: dict[int, Callable[..., resnet.ResNet]] = {
    18: resnet.resnet18,
    34: resnet.resnet34,
    50: resnet.resnet50,
    101: resnet.resnet101,
    152: resnet.resnet152,
}


class ResNet(Backbone):
    """ResNet-18/34/50/101/152 without its classifier; returns res2..res5."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        if cfg.depth not in _ARCHITECTURES:
            raise ValueError(f"ResNet depth {cfg.depth} is not supported; choose one of {sorted(_ARCHITECTURES)}")
        net = _ARCHITECTURES[cfg.depth](weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        width = 64 * (1 if cfg.depth < 50 else resnet.Bottleneck.expansion)
        self.out_channels = (width, 2 * width, 4 * width, 8 * width)
        # Channels-last convolutions: oneDNN on CPU (and cuDNN under autocast) run them faster
        # (ResNet-50 at 800 x 1216 on the project's CPU: 1.12 s vs 1.56 s). Weights keep the
        # layout through .to(), load_state_dict and checkpoints; the input is converted in forward.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B,3,H,W]`` -> res2..res5 at strides 4, 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images.contiguous(memory_format=torch.channels_last)))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features
