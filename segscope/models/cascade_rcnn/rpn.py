"""Region proposal network of Cascade Mask R-CNN, as mmdetection 2.x's ``RPNHead``.

Facts (mmdet 2.11, as shipped by the Swin Transformer detection project: ``mmdet/models/dense_heads/
rpn_head.py``, ``anchor_head.py``, ``mmdet/core/anchor/utils.py``, ``mmdet/models/losses/``; settings from
``configs/_base_/models/cascade_mask_rcnn_swin_fpn.py``):

Head: ``rpn_conv`` 3x3 (padding 1) + ReLU, then 1x1 ``rpn_cls`` (``num_anchors`` sigmoid objectness
logits: ``use_sigmoid=True`` gives one channel per anchor) and 1x1 ``rpn_reg`` (``4 * num_anchors``,
ordered anchor-major then dx, dy, dw, dh); ``normal_init(std=0.01)``, bias 0, on all three. Checkpoint
keys ``rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*`` map to ``<this module>.head.*``. The same head runs on
every pyramid level.

Proposals (``RPNHead._get_bboxes``): per level, the ``nms_pre`` highest sigmoid scores; their deltas
decoded on their anchors (``DeltaXYWHBBoxCoder``, means 0, stds 1) and clipped to the image
(``img_shape``, the unpadded size); boxes narrower or lower than ``min_bbox_size`` dropped (mmdet 2.11
only filters when ``min_bbox_size > 0``, with ``>=``, as ``remove_small_boxes``; later 2.x releases
drop boxes with ``w <= min_bbox_size``, so zero-area boxes as well); NMS at IoU 0.7 over all levels
together with the level as the group (``batched_nms``); the ``max_per_img`` best kept, sorted by score.
Training uses ``rpn_proposal``: ``nms_pre=2000, max_per_img=2000`` (the Swin config also says
``nms_post=2000``, unused by this code path); testing ``nms_pre=1000, max_per_img=1000``. Scores and
deltas are detached: no gradient flows through the proposals.

Losses (``AnchorHead.loss``): per image, only anchors inside the image take part
(``anchor_inside_flags`` with ``allowed_border=0``: ``x0 >= 0, y0 >= 0, x1 < W, y1 < H``; mmdet's
``valid_flags`` on the padded shape are implied by it); ``MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3,
match_low_quality=True)``, ``RandomSampler(256, 0.5, neg_pos_ub=-1, add_gt_as_proposals=False)``.
``loss_rpn_cls``: sigmoid binary cross-entropy (target 1 for positives, 0 for negatives) summed over
the sampled anchors; ``loss_rpn_bbox``: ``SmoothL1Loss(beta=1/9)`` between predicted and encoded gt
deltas summed over the positives' 4 coordinates; both divided by ``avg_factor = sum over images of
max(#pos, 1) + max(#neg, 1)``; loss weights 1. (Summing mmdet's per-level losses gives these totals.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, remove_small_boxes

from segscope.models.cascade_rcnn.anchors import AnchorGenerator
from segscope.models.cascade_rcnn.box_coder import DeltaXYWHBBoxCoder
from segscope.models.cascade_rcnn.sampling import MaxIoUAssigner, RandomSampler


class DetectionTarget(TypedDict):
    """One image's ground truth in network-input pixels: ``boxes [G,4]`` x0y0x1y1 float, ``labels [G]`` int64."""

    boxes: Tensor
    labels: Tensor


@dataclass(frozen=True)
class ProposalConfig:
    """Proposal selection (mmdet's ``rpn_proposal`` / ``test_cfg.rpn``)."""

    nms_pre: int
    max_per_img: int
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0

    def __post_init__(self) -> None:
        if self.nms_pre < 1 or self.max_per_img < 1:
            raise ValueError(f"nms_pre and max_per_img must be positive, got {self.nms_pre}, {self.max_per_img}")


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU and 1x1 objectness / box-delta predictors on every pyramid level."""

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, num_anchors: int = 3) -> None:
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level ``[B,C,H,W]`` -> objectness logits ``[B,A,H,W]`` and deltas ``[B,4A,H,W]``."""
        objectness, deltas = [], []
        for x in features:
            x = F.relu(self.rpn_conv(x))
            objectness.append(self.rpn_cls(x))
            deltas.append(self.rpn_reg(x))
        return objectness, deltas


def _flatten_level(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """``[B,A,H,W]``, ``[B,4A,H,W]`` -> ``[B, H*W*A]``, ``[B, H*W*A, 4]`` in the anchors' (y, x, a) order."""
    batch = objectness.shape[0]
    return objectness.permute(0, 2, 3, 1).reshape(batch, -1), deltas.permute(0, 2, 3, 1).reshape(batch, -1, 4)


class RegionProposalNetwork(nn.Module):
    """RPN head, anchors, box coder, proposal selection and (in training) the RPN losses."""

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 256,
        anchor_generator: AnchorGenerator | None = None,
        assigner: MaxIoUAssigner | None = None,
        sampler: RandomSampler | None = None,
        train_proposals: ProposalConfig = ProposalConfig(nms_pre=2000, max_per_img=2000),
        test_proposals: ProposalConfig = ProposalConfig(nms_pre=1000, max_per_img=1000),
        allowed_border: float = 0.0,
        smooth_l1_beta: float = 1.0 / 9.0,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator or AnchorGenerator()
        self.box_coder = DeltaXYWHBBoxCoder()
        self.assigner = assigner or MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True)
        self.sampler = sampler or RandomSampler(256, 0.5, add_gt_as_proposals=False)
        if self.sampler.add_gt_as_proposals:
            raise ValueError("the RPN samples anchors: its sampler must not add gt boxes as proposals")
        self.train_proposals = train_proposals
        self.test_proposals = test_proposals
        self.allowed_border = allowed_border
        self.smooth_l1_beta = smooth_l1_beta
        self.head = RPNHead(in_channels, feat_channels, self.anchor_generator.num_base_anchors)

    def forward(
        self,
        features: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[DetectionTarget] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals ``[K_i,4]`` per image (x0y0x1y1, best first) and, in training, the RPN losses.

        ``features``: the pyramid, ``[B,C,H_l,W_l]`` per anchor level (strides of the anchor generator);
        ``image_sizes``: ``(H, W)`` of each unpadded image; ``targets``: required in training;
        ``generator``: a CPU generator for the anchor sampling.
        """
        if len(features) != self.anchor_generator.num_levels:
            raise ValueError(f"expected {self.anchor_generator.num_levels} feature maps, got {len(features)}")
        if len(image_sizes) != features[0].shape[0]:
            raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {features[0].shape[0]}")
        objectness, deltas = self.head(features)
        levels = [_flatten_level(o, d) for o, d in zip(objectness, deltas)]
        anchors = self.anchor_generator.grid_anchors([f.shape[-2:] for f in features], features[0].device)
        config = self.train_proposals if self.training else self.test_proposals
        proposals = self.select_proposals(levels, anchors, image_sizes, config)
        if not self.training:
            return proposals, {}
        if targets is None or len(targets) != len(image_sizes):
            raise ValueError("training needs one target per image")
        objectness_all = torch.cat([o for o, _ in levels], dim=1)
        deltas_all = torch.cat([d for _, d in levels], dim=1)
        return proposals, self.losses(objectness_all, deltas_all, torch.cat(anchors), image_sizes, targets, generator)

    @torch.no_grad()
    def select_proposals(
        self,
        levels: Sequence[tuple[Tensor, Tensor]],
        anchors: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        config: ProposalConfig,
    ) -> list[Tensor]:
        """Per level ``(logits [B,M_l], deltas [B,M_l,4])`` and anchors ``[M_l,4]`` -> ``[K_i,4]`` per image."""
        scores, boxes_deltas, boxes_anchors, level_ids = [], [], [], []
        for level, ((logits, deltas), level_anchors) in enumerate(zip(levels, anchors)):
            top_scores, top = logits.float().sigmoid().topk(min(config.nms_pre, logits.shape[1]), dim=1)
            scores.append(top_scores)
            boxes_deltas.append(torch.gather(deltas.float(), 1, top[..., None].expand(-1, -1, 4)))
            boxes_anchors.append(level_anchors[top])
            level_ids.append(torch.full((top.shape[1],), level, dtype=torch.long, device=top.device))
        scores_all, deltas_all = torch.cat(scores, dim=1), torch.cat(boxes_deltas, dim=1)
        anchors_all, ids = torch.cat(boxes_anchors, dim=1), torch.cat(level_ids)
        proposals = []
        for image_scores, image_deltas, image_anchors, size in zip(scores_all, deltas_all, anchors_all, image_sizes):
            boxes = self.box_coder.decode(image_anchors, image_deltas, max_shape=size)
            keep = remove_small_boxes(boxes, config.min_bbox_size)
            boxes, image_scores, image_ids = boxes[keep], image_scores[keep], ids[keep]
            keep = batched_nms(boxes, image_scores, image_ids, config.iou_threshold)[: config.max_per_img]
            proposals.append(boxes[keep])
        return proposals

    def losses(
        self,
        objectness: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[DetectionTarget],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """``loss_rpn_cls`` and ``loss_rpn_bbox`` from logits ``[B,M]``, deltas ``[B,M,4]``, anchors ``[M,4]``."""
        logits, labels, pred_deltas, target_deltas = [], [], [], []
        avg_factor = 0
        border = self.allowed_border
        for image_logits, image_deltas, (height, width), target in zip(objectness, deltas, image_sizes, targets):
            inside = (
                (anchors[:, 0] >= -border)
                & (anchors[:, 1] >= -border)
                & (anchors[:, 2] < width + border)
                & (anchors[:, 3] < height + border)
            )
            inside_inds = torch.nonzero(inside).squeeze(1)
            gt_boxes = target["boxes"].to(anchors)
            candidates = anchors[inside_inds]
            sample = self.sampler(self.assigner(candidates, gt_boxes), candidates, gt_boxes, generator)
            pos, neg = inside_inds[sample.pos_inds], inside_inds[sample.neg_inds]
            logits += [image_logits[pos], image_logits[neg]]
            labels += [image_logits.new_ones(pos.numel()), image_logits.new_zeros(neg.numel())]
            pred_deltas.append(image_deltas[pos])
            target_deltas.append(self.box_coder.encode(anchors[pos], gt_boxes[sample.pos_assigned_gt_inds]))
            avg_factor += max(pos.numel(), 1) + max(neg.numel(), 1)
        loss_cls = F.binary_cross_entropy_with_logits(
            torch.cat(logits).float(), torch.cat(labels).float(), reduction="sum"
        )
        loss_bbox = F.smooth_l1_loss(
            torch.cat(pred_deltas).float(), torch.cat(target_deltas), beta=self.smooth_l1_beta, reduction="sum"
        )
        return {"loss_rpn_cls": loss_cls / avg_factor, "loss_rpn_bbox": loss_bbox / avg_factor}
