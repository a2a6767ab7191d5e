"""Weight initializations shared by the heads, named after the reference code's."""

from __future__ import annotations

from torch import nn


def caffe2_xavier_init(layer: nn.Conv2d | nn.Linear) -> None:
    """detectron2's ``c2_xavier_fill``: Caffe2's "Xavier" (uniform, fan-in, a=1), zero bias.

    Used where the reference heads (FPN convs, Mask2Former's pixel decoder) use it, so that
    training from scratch starts where theirs does.
    """
    nn.init.kaiming_uniform_(layer.weight, a=1)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
