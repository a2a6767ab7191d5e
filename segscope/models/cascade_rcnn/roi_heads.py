"""Cascade RoI heads of Cascade Mask R-CNN, as mmdetection 2.x's ``CascadeRoIHead`` with the Swin 3x config.

Facts (mmdet 2.11, as shipped by the Swin Transformer detection project: ``mmdet/models/roi_heads/
cascade_roi_head.py``, ``roi_extractors/single_level_roi_extractor.py``, ``bbox_heads/bbox_head.py``,
``bbox_heads/convfc_bbox_head.py``, ``mmdet/core/post_processing/bbox_nms.py`` (``multiclass_nms``),
``merge_augs.py`` (``merge_aug_masks``), ``mmdet/models/losses/iou_loss.py``; settings from
``configs/_base_/models/cascade_mask_rcnn_swin_fpn.py`` and
``configs/swin/cascade_mask_rcnn_swin_base_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py``):

RoI features (``SingleRoIExtractor``): level ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to
``[0, 3]`` with ``finest_scale=56`` over strides ``[4, 8, 16, 32]`` (P2-P5); mmcv ``RoIAlign(output_size,
sampling_ratio=0)`` whose ``aligned`` default is ``True``; 7x7 for boxes, 14x14 for masks.

Box heads (``ConvFCBBoxHead``, one per stage): 4 shared ``ConvModule`` 3x3 256 + BN (SyncBN in the
config; plain ``BatchNorm2d`` here, convert with ``nn.SyncBatchNorm.convert_sync_batchnorm``) + ReLU
(``shared_convs.i.conv`` without bias, ``shared_convs.i.bn``), flatten, ``shared_fcs.0`` 12544 -> 1024 +
ReLU, ``fc_cls`` -> C + 1 (background last), ``fc_reg`` -> 4C. The 3x config overrides the base
config's ``reg_class_agnostic=True`` with ``False``, so the default here is class-specific (4C outputs;
``reg_class_agnostic=True`` gives 4). Init: ``fc_cls`` normal(0.01), ``fc_reg`` normal(0.001),
``shared_fcs`` xavier-uniform, biases 0, convs kaiming (fan_out), BN weight 1 and bias 0.
Coder stds per stage ``(0.1, 0.1, 0.2, 0.2)``, ``(0.05, 0.05, 0.1, 0.1)``, ``(0.033, 0.033, 0.067, 0.067)``.

Training (``forward_train``), stage ``i`` with loss weight ``[1, 0.5, 0.25][i]``:

- per image ``MaxIoUAssigner(t, t, t, match_low_quality=False)``, ``t = 0.5 / 0.6 / 0.7``, and
  ``RandomSampler(512, 0.25, add_gt_as_proposals=True)``; the RoIs are the positives then the negatives;
- ``loss_cls``: softmax cross-entropy over C + 1 (negatives labelled C), mean over the sampled RoIs;
- ``loss_bbox`` (``reg_decoded_bbox=True``): the predicted deltas (the gt class's, when class-specific)
  are decoded on their RoIs (no clipping) and compared with the gt boxes by ``GIoULoss(loss_weight=10)``
  (``1 - GIoU``), summed over the positives and divided by the number of sampled RoIs (``avg_factor =
  bbox_targets.size(0)``); zero without positives;
- ``loss_mask``: the mask head on the positive RoIs (gt boxes added as proposals included), targets and
  loss of ``mask_head.py``;
- refinement for the next stage (``refine_bboxes``, no gradient): every sampled RoI is decoded with its
  label (the gt class for positives, the argmax of the foreground scores for negatives), clipped to the
  image, and the gt boxes that the sampler added are dropped: the next stage samples from the ~512
  refined RoIs per image, not from the RPN's proposals.

Testing (``simple_test``, ``rescale=False``): each stage's boxes come from the previous stage's
regression with the argmax of that stage's own foreground scores (clipped to the image); the three
stages' class **logits** are averaged, then softmaxed; the last stage's deltas are decoded (clipped) for
every class; ``multiclass_nms``: scores ``> 0.05`` (strict), NMS at IoU 0.5 within each class, the 100
best. Masks: every stage's mask head runs on the final boxes; the sigmoid probabilities are averaged over
the stages (``merge_aug_masks``) and the channel of the detected class is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, roi_align

from segscope.models.cascade_rcnn.box_coder import DeltaXYWHBBoxCoder
from segscope.models.cascade_rcnn.mask_head import ConvModule, FCNMaskHead, mask_loss, mask_targets
from segscope.models.cascade_rcnn.rpn import DetectionTarget
from segscope.models.cascade_rcnn.sampling import MaxIoUAssigner, RandomSampler, SamplingResult


class InstanceTarget(DetectionTarget):
    """A ``DetectionTarget`` plus ``masks [G,H,W]`` (0/1, any dtype): the gt bitmaps in network-input pixels."""

    masks: Tensor


class SingleRoIExtractor(nn.Module):
    """Pools each RoI from the one pyramid level its size maps to (FPN's rule with mmdet's constants)."""

    def __init__(
        self, output_size: int, featmap_strides: Sequence[int] = (4, 8, 16, 32), finest_scale: float = 56.0
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.featmap_strides = tuple(featmap_strides)
        self.finest_scale = finest_scale

    def map_levels(self, boxes: Tensor) -> Tensor:
        """Level index ``[N]`` (0 = finest) of x0y0x1y1 ``boxes [N,4]``."""
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(0, len(self.featmap_strides) - 1).long()

    def forward(self, features: Sequence[Tensor], rois: Tensor) -> Tensor:
        """``features``: ``[B,C,H_l,W_l]`` per stride; ``rois [N,5]`` (image index, x0, y0, x1, y1) -> ``[N,C,S,S]``."""
        features = features[: len(self.featmap_strides)]
        size = self.output_size
        out = features[0].new_zeros(rois.shape[0], features[0].shape[1], size, size)
        levels = self.map_levels(rois[:, 1:])
        for level, (feature, stride) in enumerate(zip(features, self.featmap_strides)):
            inds = torch.nonzero(levels == level).squeeze(1)
            if inds.numel() > 0:
                out[inds] = roi_align(feature, rois[inds].to(feature.dtype), size, 1.0 / stride, 0, aligned=True)
        return out


class ConvFCBBoxHead(nn.Module):
    """Shared convs + fcs, then class logits ``[N,C+1]`` and box deltas ``[N,4]`` or ``[N,4C]``."""

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        roi_feat_size: int = 7,
        num_shared_convs: int = 4,
        num_shared_fcs: int = 1,
        conv_out_channels: int = 256,
        fc_out_channels: int = 1024,
        reg_class_agnostic: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_class_agnostic = reg_class_agnostic
        self.shared_convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, with_norm=True)
            for i in range(num_shared_convs)
        )
        last = (conv_out_channels if num_shared_convs > 0 else in_channels) * roi_feat_size**2
        fcs = []
        for _ in range(num_shared_fcs):
            fcs.append(nn.Linear(last, fc_out_channels))
            last = fc_out_channels
        self.shared_fcs = nn.ModuleList(fcs)
        self.fc_cls = nn.Linear(last, num_classes + 1)
        self.fc_reg = nn.Linear(last, 4 if reg_class_agnostic else 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """RoI features ``[N,C,S,S]`` -> ``(cls_logits [N,C+1], deltas [N,4] or [N,4C])``."""
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


@dataclass(frozen=True)
class DetectionConfig:
    """Test-time selection (mmdet's ``test_cfg.rcnn``)."""

    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_per_img: int = 100


DEFAULT_STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def _to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per image ``[N_i,4]`` -> ``[sum N_i,5]`` with the image index first (mmdet's ``bbox2roi``)."""
    return torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])


def _select_deltas(deltas: Tensor, labels: Tensor) -> Tensor:
    """``[N,4]`` deltas: the ``labels [N]`` class's of class-specific ``deltas [N,4C]``, or ``deltas [N,4]`` itself."""
    if deltas.shape[1] == 4:
        return deltas
    return deltas.view(deltas.shape[0], deltas.shape[1] // 4, 4)[
        torch.arange(deltas.shape[0], device=deltas.device), labels
    ]


class CascadeRoIHeads(nn.Module):
    """Three box stages of rising IoU thresholds with a mask head each (rules above)."""

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        fc_out_channels: int = 1024,
        reg_class_agnostic: bool = False,
        stage_stds: Sequence[Sequence[float]] = DEFAULT_STAGE_STDS,
        stage_iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7),
        stage_loss_weights: Sequence[float] = (1.0, 0.5, 0.25),
        num_samples: int = 512,
        pos_fraction: float = 0.25,
        bbox_loss_weight: float = 10.0,
        featmap_strides: Sequence[int] = (4, 8, 16, 32),
        test_config: DetectionConfig = DetectionConfig(),
    ) -> None:
        super().__init__()
        if not len(stage_stds) == len(stage_iou_thresholds) == len(stage_loss_weights) > 0:
            raise ValueError("stage_stds, stage_iou_thresholds and stage_loss_weights need one entry per stage")
        self.num_classes = num_classes
        self.num_stages = len(stage_stds)
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.bbox_loss_weight = bbox_loss_weight
        self.test_config = test_config
        self.bbox_roi_extractor = SingleRoIExtractor(7, featmap_strides)
        self.mask_roi_extractor = SingleRoIExtractor(14, featmap_strides)
        self.bbox_head = nn.ModuleList(
            ConvFCBBoxHead(
                num_classes,
                in_channels,
                conv_out_channels=conv_out_channels,
                fc_out_channels=fc_out_channels,
                reg_class_agnostic=reg_class_agnostic,
            )
            for _ in range(self.num_stages)
        )
        self.mask_head = nn.ModuleList(
            FCNMaskHead(num_classes, in_channels, conv_out_channels) for _ in range(self.num_stages)
        )
        self.box_coders = [DeltaXYWHBBoxCoder(stds=stds) for stds in stage_stds]
        self.assigners = [MaxIoUAssigner(t, t, t, match_low_quality=False) for t in stage_iou_thresholds]
        self.sampler = RandomSampler(num_samples, pos_fraction, add_gt_as_proposals=True)

    def forward(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[InstanceTarget] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor] | list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Training: the weighted losses ``loss_{cls,bbox,mask}_s{i}``; eval: per image ``(boxes [K,4], scores
        [K], labels [K], mask_probs [K,28,28])`` in network-input pixels (paste with ``paste_masks``).

        ``features``: P2-P5 (further levels are ignored), ``[B,C,H_l,W_l]``; ``proposals``: ``[N_i,4]`` per
        image (detached); ``image_sizes``: ``(H, W)`` of each unpadded image; ``targets``: training only;
        ``generator``: a CPU generator for the RoI sampling.
        """
        if len(proposals) != len(image_sizes):
            raise ValueError(f"got {len(proposals)} proposal sets for {len(image_sizes)} images")
        if not self.training:
            return self.predict(features, proposals, image_sizes)
        if targets is None or len(targets) != len(image_sizes):
            raise ValueError("training needs one target per image")
        return self.losses(features, proposals, image_sizes, targets, generator)

    def losses(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[InstanceTarget],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The per-stage weighted losses (rules in the module docstring)."""
        losses: dict[str, Tensor] = {}
        proposals = [p.detach() for p in proposals]
        for stage in range(self.num_stages):
            weight = self.stage_loss_weights[stage]
            samples = []
            for image_proposals, target in zip(proposals, targets):
                gt_boxes = target["boxes"].to(image_proposals)
                assign = self.assigners[stage](image_proposals, gt_boxes)
                samples.append(self.sampler(assign, image_proposals, gt_boxes, generator))
            rois = _to_rois([torch.cat([s.pos_boxes, s.neg_boxes]) for s in samples])
            labels, gt_for_rois = self._box_targets(samples, targets)
            cls_logits, deltas = self.bbox_head[stage](self.bbox_roi_extractor(features, rois))
            losses[f"loss_cls_s{stage}"] = weight * F.cross_entropy(cls_logits.float(), labels)
            losses[f"loss_bbox_s{stage}"] = weight * self._box_loss(stage, rois, deltas, labels, gt_for_rois)
            losses[f"loss_mask_s{stage}"] = weight * self._mask_loss(stage, features, samples, targets)
            if stage < self.num_stages - 1:
                proposals = self._refine(stage, rois, cls_logits, deltas, labels, samples, image_sizes)
        return losses

    def _box_targets(
        self, samples: Sequence[SamplingResult], targets: Sequence[InstanceTarget]
    ) -> tuple[Tensor, Tensor]:
        """Labels ``[N]`` (``num_classes`` for negatives) and gt boxes ``[N,4]`` (zeros for negatives) of the RoIs."""
        labels, boxes = [], []
        for sample, target in zip(samples, targets):
            num_neg = sample.neg_inds.numel()
            pos_labels = target["labels"].to(sample.boxes.device)[sample.pos_assigned_gt_inds]
            labels += [pos_labels, pos_labels.new_full((num_neg,), self.num_classes)]
            boxes += [target["boxes"].to(sample.boxes)[sample.pos_assigned_gt_inds], sample.boxes.new_zeros(num_neg, 4)]
        return torch.cat(labels), torch.cat(boxes)

    def _box_loss(self, stage: int, rois: Tensor, deltas: Tensor, labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """GIoU loss of the decoded positive boxes against ``gt_boxes [N,4]``, over all ``N`` sampled RoIs."""
        positive = labels < self.num_classes
        if not positive.any():
            return deltas.sum() * 0.0
        pos_deltas = _select_deltas(deltas[positive].float(), labels[positive])
        decoded = self.box_coders[stage].decode(rois[positive, 1:], pos_deltas)
        loss = generalized_box_iou_loss(decoded, gt_boxes[positive], reduction="sum")
        return self.bbox_loss_weight * loss / rois.shape[0]

    def _mask_loss(
        self,
        stage: int,
        features: Sequence[Tensor],
        samples: Sequence[SamplingResult],
        targets: Sequence[InstanceTarget],
    ) -> Tensor:
        """Mask loss on the positive RoIs of ``samples`` (one per image)."""
        pos_rois = _to_rois([s.pos_boxes for s in samples])
        logits = self.mask_head[stage](self.mask_roi_extractor(features, pos_rois))
        goals, labels = [], []
        for sample, target in zip(samples, targets):
            gt_masks = target["masks"].to(sample.boxes.device)
            goals.append(mask_targets(sample.pos_boxes, gt_masks, sample.pos_assigned_gt_inds, logits.shape[-1]))
            labels.append(target["labels"].to(logits.device)[sample.pos_assigned_gt_inds])
        return mask_loss(logits, torch.cat(goals), torch.cat(labels))

    @torch.no_grad()
    def _refine(
        self,
        stage: int,
        rois: Tensor,
        cls_logits: Tensor,
        deltas: Tensor,
        labels: Tensor,
        samples: Sequence[SamplingResult],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Tensor]:
        """Next stage's proposals: the sampled RoIs regressed by this stage, without the added gt boxes."""
        labels = torch.where(labels == self.num_classes, cls_logits[:, :-1].argmax(dim=1), labels)
        chosen = _select_deltas(deltas.float(), labels)
        refined = []
        for image, (sample, size) in enumerate(zip(samples, image_sizes)):
            inds = torch.nonzero(rois[:, 0] == image).squeeze(1)
            boxes = self.box_coders[stage].decode(rois[inds, 1:], chosen[inds], max_shape=size)
            keep = torch.ones(inds.numel(), dtype=torch.bool, device=boxes.device)
            keep[: sample.pos_is_gt.numel()] = ~sample.pos_is_gt
            refined.append(boxes[keep])
        return refined

    @torch.no_grad()
    def predict(
        self, features: Sequence[Tensor], proposals: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per image ``(boxes [K,4], scores [K], labels [K], mask_probs [K,28,28])`` (rules in the module docstring)."""
        counts = [p.shape[0] for p in proposals]
        rois = _to_rois(proposals)
        stage_logits = []
        for stage in range(self.num_stages):
            cls_logits, deltas = self.bbox_head[stage](self.bbox_roi_extractor(features, rois))
            stage_logits.append(cls_logits)
            if stage < self.num_stages - 1:
                chosen = _select_deltas(deltas, cls_logits[:, :-1].argmax(dim=1))
                rois = self._decode_per_image(stage, rois, chosen, counts, image_sizes)
        scores = F.softmax(torch.stack(stage_logits).mean(dim=0).float(), dim=-1)
        boxes_all = self._decode_per_image(self.num_stages - 1, rois, deltas.float(), counts, image_sizes)
        detections = [
            self._select(boxes[:, 1:], image_scores)
            for boxes, image_scores in zip(boxes_all.split(counts), scores.split(counts))
        ]
        mask_rois = _to_rois([boxes for boxes, _, _ in detections])
        mask_labels = torch.cat([labels for _, _, labels in detections])
        side = 2 * self.mask_roi_extractor.output_size
        mask_probs = mask_rois.new_zeros(mask_rois.shape[0], side, side)
        if mask_rois.shape[0] > 0:
            mask_feats = self.mask_roi_extractor(features, mask_rois)
            index = torch.arange(mask_rois.shape[0], device=mask_rois.device)
            stacked = [head(mask_feats)[index, mask_labels].sigmoid() for head in self.mask_head]
            mask_probs = torch.stack(stacked).mean(dim=0)
        counts = [boxes.shape[0] for boxes, _, _ in detections]
        return [(*det, probs) for det, probs in zip(detections, mask_probs.split(counts))]

    def _decode_per_image(
        self, stage: int, rois: Tensor, deltas: Tensor, counts: Sequence[int], image_sizes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """Decode ``deltas [N,4k]`` on ``rois [N,5]`` with stage ``stage``'s coder, clipped per image.

        Returns ``[N,1+4k]``: the image index, then the ``k`` boxes.
        """
        decoded = [
            self.box_coders[stage].decode(image_rois[:, 1:], image_deltas, max_shape=size)
            if image_rois.shape[0] > 0
            else image_deltas
            for image_rois, image_deltas, size in zip(rois.split(counts), deltas.split(counts), image_sizes)
        ]
        return torch.cat([rois[:, :1], torch.cat(decoded)], dim=1)

    def _select(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mmdet's ``multiclass_nms``: ``boxes [N,4]`` or ``[N,4C]``, ``scores [N,C+1]`` -> boxes, scores, labels."""
        num, num_classes = scores.shape[0], scores.shape[1] - 1
        boxes = boxes.view(num, boxes.shape[1] // 4, 4).expand(num, num_classes, 4).reshape(-1, 4)
        labels = torch.arange(num_classes, device=scores.device).repeat(num)
        flat_scores = scores[:, :-1].reshape(-1)
        valid = torch.nonzero(flat_scores > self.test_config.score_threshold).squeeze(1)
        boxes, flat_scores, labels = boxes[valid], flat_scores[valid], labels[valid]
        keep = batched_nms(boxes, flat_scores, labels, self.test_config.nms_threshold)[: self.test_config.max_per_img]
        return boxes[keep], flat_scores[keep], labels[keep]
