"""Cascade Mask R-CNN checkpoints of mmdetection 2.x (the Swin project's releases) -> segscope.

segscope's detector keeps mmdetection's module names (``backbone``, ``neck``, ``roi_head``) except
the RPN, whose head sits under ``rpn.head`` (mmdet: ``rpn_head``). The Swin backbone of the Swin
project's detection code uses the official Swin names, which are segscope's. Dropped: the Swin
attention's ``relative_position_index`` buffers (rebuilt), mmdet's EMA copies and DDP's ``module.``
(``mmlab.mmlab_weights``, shared with the Mask2Former converters).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from segscope.checkpoints.mmlab import mmlab_weights
from segscope.checkpoints.safe_load import StateDict


def convert_mmdet2_cascade_mask_rcnn(state_dict: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """An mmdetection 2.x ``CascadeRCNN`` state dict renamed for segscope's ``CascadeMaskRCNN``."""
    del model  # nothing to resize: the release's windows and sizes are the model's
    converted: StateDict = {}
    for key, value in mmlab_weights(state_dict, "roi_head", "an mmdetection Cascade R-CNN"):
        if key.startswith("rpn_head."):
            key = "rpn.head." + key.removeprefix("rpn_head.")
        converted[key] = value
    return converted
