"""Cascade Mask R-CNN checkpoints of mmdetection 2.x (the Swin project's releases) -> segscope.

segscope's detector keeps mmdetection's module names (``backbone``, ``neck``, ``roi_head``) except
the RPN, whose head sits under ``rpn.head`` (mmdet: ``rpn_head``). The Swin backbone of the Swin
project's detection code uses the official Swin names, which are segscope's. Dropped: the Swin
attention's ``relative_position_index`` buffers (rebuilt), mmdet's EMA copies and DDP's ``module.``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from segscope.checkpoints.safe_load import StateDict
from segscope.errors import CheckpointError

_DROPPED = re.compile(r".*\.relative_position_index|ema_.*|data_preprocessor\..*")


def convert_mmdet2_cascade_mask_rcnn(state_dict: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """An mmdetection 2.x ``CascadeRCNN`` state dict renamed for segscope's ``CascadeMaskRCNN``."""
    del model  # nothing to resize: the release's windows and sizes are the model's
    keys = [key.removeprefix("module.") for key in state_dict]
    if not any(key.startswith("roi_head.") for key in keys):
        prefixes = sorted({key.split(".", 1)[0] for key in keys})[:8]
        raise CheckpointError(f"not an mmdetection Cascade R-CNN checkpoint: no 'roi_head.*' weights ({prefixes})")
    converted: StateDict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if _DROPPED.fullmatch(key):
            continue
        if key.startswith("rpn_head."):
            key = "rpn.head." + key.removeprefix("rpn_head.")
        converted[key] = value
    return converted
