"""Cascade Mask R-CNN (Cai & Vasconcelos 2018) as mmdetection 2.x builds it: FPN neck, region proposals, RoI heads."""

from segscope.models.cascade_rcnn.anchors import AnchorGenerator
from segscope.models.cascade_rcnn.box_coder import DeltaXYWHBBoxCoder
from segscope.models.cascade_rcnn.fpn import FPN
from segscope.models.cascade_rcnn.mask_head import FCNMaskHead, mask_loss, mask_targets, paste_masks
from segscope.models.cascade_rcnn.roi_heads import (
    CascadeRoIHeads,
    ConvFCBBoxHead,
    DetectionConfig,
    InstanceTarget,
    SingleRoIExtractor,
)
from segscope.models.cascade_rcnn.rpn import DetectionTarget, ProposalConfig, RegionProposalNetwork, RPNHead
from segscope.models.cascade_rcnn.sampling import AssignResult, MaxIoUAssigner, RandomSampler, SamplingResult

__all__ = [
    "FPN",
    "AnchorGenerator",
    "AssignResult",
    "CascadeRoIHeads",
    "ConvFCBBoxHead",
    "DeltaXYWHBBoxCoder",
    "DetectionConfig",
    "DetectionTarget",
    "FCNMaskHead",
    "InstanceTarget",
    "MaxIoUAssigner",
    "ProposalConfig",
    "RPNHead",
    "RandomSampler",
    "RegionProposalNetwork",
    "SamplingResult",
    "SingleRoIExtractor",
    "mask_loss",
    "mask_targets",
    "paste_masks",
]
