"""Cascade Mask R-CNN: backbone -> FPN -> RPN -> cascade RoI heads (box stages and mask heads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from segscope.config import CascadeMaskRCNNConfig
from segscope.models.backbones import build_backbone
from segscope.models.cascade_rcnn.fpn import FPN
from segscope.models.cascade_rcnn.roi_heads import CascadeRoIHeads, DetectionConfig, InstanceTarget
from segscope.models.cascade_rcnn.rpn import ProposalConfig, RegionProposalNetwork

Detection = tuple[Tensor, Tensor, Tensor, Tensor]  # boxes [K,4], scores [K], labels [K], mask_probs [K,28,28]


@dataclass
class CascadeOutput:
    """Per image of the batch: ``(boxes [K,4], scores [K], labels [K], mask_probs [K,28,28])``, boxes in
    pixels of the padded network input, best first."""

    detections: list[Detection]


class CascadeMaskRCNN(nn.Module):
    """The detector of the Swin project's Cascade Mask R-CNN config (module names as mmdetection's:
    ``backbone``, ``neck``, ``rpn`` (mmdet's ``rpn_head`` under ``rpn.head``), ``roi_head``)."""

    def __init__(self, cfg: CascadeMaskRCNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.neck = FPN(self.backbone.out_channels, cfg.fpn_channels, num_outs=5)
        self.rpn = RegionProposalNetwork(
            cfg.fpn_channels,
            cfg.fpn_channels,
            test_proposals=ProposalConfig(nms_pre=cfg.rpn_test_proposals, max_per_img=cfg.rpn_test_proposals),
        )
        self.roi_head = CascadeRoIHeads(
            cfg.num_classes,
            cfg.fpn_channels,
            conv_out_channels=cfg.head_conv_channels,
            fc_out_channels=cfg.head_fc_channels,
            reg_class_agnostic=cfg.reg_class_agnostic,
            test_config=DetectionConfig(cfg.score_threshold, cfg.nms_threshold, cfg.max_detections),
        )

    def forward(
        self, images: Tensor, targets: Sequence[InstanceTarget] | None = None
    ) -> CascadeOutput | dict[str, Tensor]:
        """``images [B,3,H,W]`` normalized and padded. Without ``targets`` the detections; with them
        (``{"boxes" [G,4], "labels" [G], "masks" [G,H,W]}`` per image) the RPN and cascade losses.

        Boxes are clipped to the padded input (the network is not told where padding starts; the
        post-processing clips again to each resized image).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B,3,H,W], got {tuple(images.shape)}")
        features = self.neck(self.backbone(images))
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        proposals, rpn_losses = self.rpn(features, sizes, targets)
        if targets is None:
            return CascadeOutput(self.roi_head(features[:4], proposals, sizes))
        return {**rpn_losses, **self.roi_head(features[:4], proposals, sizes, targets)}
