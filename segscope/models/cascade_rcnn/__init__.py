"""Cascade Mask R-CNN (Cai & Vasconcelos 2018) as mmdetection 2.x builds it: FPN neck and region proposals."""

from segscope.models.cascade_rcnn.anchors import AnchorGenerator
from segscope.models.cascade_rcnn.box_coder import DeltaXYWHBBoxCoder
from segscope.models.cascade_rcnn.fpn import FPN
from segscope.models.cascade_rcnn.rpn import DetectionTarget, ProposalConfig, RegionProposalNetwork, RPNHead
from segscope.models.cascade_rcnn.sampling import AssignResult, MaxIoUAssigner, RandomSampler, SamplingResult

__all__ = [
    "FPN",
    "AnchorGenerator",
    "AssignResult",
    "DeltaXYWHBBoxCoder",
    "DetectionTarget",
    "MaxIoUAssigner",
    "ProposalConfig",
    "RPNHead",
    "RandomSampler",
    "RegionProposalNetwork",
    "SamplingResult",
]
