"""Cascade Mask R-CNN in the architecture registry: instances only."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from segscope.config import CascadeMaskRCNNConfig, SwinConfig, cascade_mask_rcnn_config_from_dict
from segscope.devices import to_host
from segscope.models.cascade_rcnn.mask_head import paste_masks
from segscope.models.cascade_rcnn.model import CascadeMaskRCNN, CascadeOutput
from segscope.predictions import ImageSizes, InstancePrediction
from segscope.registry import Architecture, FileFormat, register


def _postprocess(
    config: CascadeMaskRCNNConfig,
    outputs: CascadeOutput,
    sizes: Sequence[ImageSizes],
    task: str,
    threshold: float | None,
    is_thing: Tensor,
) -> list[InstancePrediction]:
    """Each image's detections at its original size, on the CPU, copied there together."""
    predictions = [_image_detections(outputs, index, image_sizes) for index, image_sizes in enumerate(sizes)]
    return [InstancePrediction(*tensors) for tensors in to_host([_fields(p) for p in predictions])]


def _fields(prediction: InstancePrediction) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return prediction.masks, prediction.labels, prediction.scores, prediction.boxes


def _image_detections(outputs: CascadeOutput, index: int, sizes: ImageSizes) -> InstancePrediction:
    """Image ``index``'s detections at its original size: boxes clipped to the resized image and
    scaled back, masks pasted into them (mmdet's ``rescale=True``)."""
    boxes, scores, labels, mask_probs = outputs.detections[index]
    (resized_h, resized_w), (height, width) = sizes.resized, sizes.original
    scale = boxes.new_tensor([width / resized_w, height / resized_h, width / resized_w, height / resized_h])
    boxes = clip_boxes_to_image(clip_boxes_to_image(boxes.float(), sizes.resized) * scale, (height, width))
    masks = paste_masks(mask_probs.float(), boxes, (height, width))
    return InstancePrediction(masks=masks, labels=labels, scores=scores.float(), boxes=boxes)


def _mmdet2() -> FileFormat:
    from segscope.checkpoints.mmdet_cascade import convert_mmdet2_cascade_mask_rcnn
    from segscope.checkpoints.mmlab import read_mmlab_checkpoint

    return read_mmlab_checkpoint, convert_mmdet2_cascade_mask_rcnn


def _modelscope() -> FileFormat:
    """The card's ModelScope folder: mmdetection 2.x weights in ``pytorch_model.pt``."""
    from segscope.checkpoints.mmdet_cascade import convert_mmdet2_cascade_mask_rcnn
    from segscope.checkpoints.modelscope import modelscope_reader

    return modelscope_reader("cascade_mask_rcnn_swin"), convert_mmdet2_cascade_mask_rcnn


def _example_config(num_classes: int) -> CascadeMaskRCNNConfig:
    """A Cascade Mask R-CNN of about a million parameters (Swin of width 16, 32-wide FPN and heads)."""
    return CascadeMaskRCNNConfig(
        backbone=SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4),
        num_classes=num_classes,
        fpn_channels=32,
        head_conv_channels=32,
        head_fc_channels=64,
        rpn_test_proposals=100,
    )


CASCADE_MASK_RCNN = register(
    Architecture(
        name="cascade_mask_rcnn",
        config_class=CascadeMaskRCNNConfig,
        config_from_dict=cascade_mask_rcnn_config_from_dict,
        build=CascadeMaskRCNN,
        tasks=("instance",),
        postprocess=_postprocess,
        default_threshold=lambda config, task: 0.5,
        window_scores=None,
        file_formats={"mmdet2": _mmdet2, "modelscope": _modelscope},
        example_config=_example_config,
    )
)
