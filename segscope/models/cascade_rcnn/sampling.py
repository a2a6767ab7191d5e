"""Assignment of candidate boxes to ground truth and sampling of training boxes (mmdetection 2.x rules).

Facts (mmdet 2.11 ``mmdet/core/bbox/assigners/max_iou_assigner.py``, ``samplers/random_sampler.py``,
``samplers/base_sampler.py``; thresholds from ``configs/_base_/models/cascade_mask_rcnn_swin_fpn.py``):

``MaxIoUAssigner`` marks every candidate ``-1`` (ignored), then, in this order:

1. IoU with every gt below ``neg_iou_thr``: ``0`` (negative);
2. best IoU ``>= pos_iou_thr``: ``1 + index of the best gt``;
3. with ``match_low_quality``, for each gt ``i`` in order whose best IoU is ``>= min_pos_iou``, every
   candidate whose IoU with ``i`` equals that best (``gt_max_assign_all=True``) becomes ``i + 1``, even
   if its own best gt is another one; a later gt overwrites an earlier one;
4. no gt: every candidate negative.

IoU is mmdet's ``bbox_overlaps`` without ``+ 1`` (torchvision's ``box_iou``; mmdet adds 1e-6 to the
union, which only matters for zero-area boxes: gt boxes must have positive area). The RPN uses
``(pos 0.7, neg 0.3, min_pos 0.3, match_low_quality=True)``; the three cascade stages
``(0.5, 0.5, 0.5)``, ``(0.6, 0.6, 0.6)``, ``(0.7, 0.7, 0.7)`` with ``match_low_quality=False``.
``ignore_iof_thr=-1`` everywhere, so ignored (crowd) gt boxes play no part and are not supported.

``RandomSampler(num, pos_fraction, neg_pos_ub=-1, add_gt_as_proposals)``: optionally puts the gt boxes
in front of the candidates (assigned to themselves, IoU 1); draws at most ``int(num * pos_fraction)``
positives uniformly (``randperm``), then at most ``num - #pos`` negatives (capped at
``neg_pos_ub * max(#pos, 1)`` when ``neg_pos_ub >= 0``); indices come out sorted (mmdet's ``unique``).
RPN: ``(256, 0.5, add_gt_as_proposals=False)``; cascade stages: ``(512, 0.25, add_gt_as_proposals=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass
class AssignResult:
    """Per candidate: ``gt_inds [N]`` int64 (``-1`` ignored, ``0`` negative, ``k >= 1``: gt ``k - 1``)
    and ``max_overlaps [N]``, its best IoU with any gt (0 when there is none)."""

    gt_inds: Tensor
    max_overlaps: Tensor


@dataclass
class SamplingResult:
    """Sampled candidates. ``boxes [M,4]`` are the candidates sampled from (the gt boxes first when the
    sampler adds them); ``pos_inds [P]``, ``neg_inds [Q]`` index ``boxes``; ``pos_assigned_gt_inds [P]``
    is the gt index of each positive and ``pos_is_gt [P]`` tells the added gt boxes apart."""

    boxes: Tensor
    pos_inds: Tensor
    neg_inds: Tensor
    pos_assigned_gt_inds: Tensor
    pos_is_gt: Tensor

    @property
    def pos_boxes(self) -> Tensor:
        """``[P,4]``"""
        return self.boxes[self.pos_inds]

    @property
    def neg_boxes(self) -> Tensor:
        """``[Q,4]``"""
        return self.boxes[self.neg_inds]


class MaxIoUAssigner:
    """Assigns each candidate box to the gt box it overlaps most, or to background (rules above)."""

    def __init__(
        self, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float = 0.0, match_low_quality: bool = True
    ) -> None:
        if not 0.0 <= neg_iou_thr <= pos_iou_thr <= 1.0:
            raise ValueError(f"need 0 <= neg_iou_thr ({neg_iou_thr}) <= pos_iou_thr ({pos_iou_thr}) <= 1")
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality

    @torch.no_grad()
    def __call__(self, boxes: Tensor, gt_boxes: Tensor) -> AssignResult:
        """Assign candidate ``boxes [N,4]`` to ``gt_boxes [G,4]`` (both x0y0x1y1)."""
        num_gts, num_boxes = gt_boxes.shape[0], boxes.shape[0]
        if num_gts == 0 or num_boxes == 0:
            fill = 0 if num_gts == 0 else -1
            gt_inds = torch.full((num_boxes,), fill, dtype=torch.long, device=boxes.device)
            return AssignResult(gt_inds, boxes.new_zeros(num_boxes))
        overlaps = box_iou(gt_boxes, boxes)  # [G, N]
        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=boxes.device)
        gt_inds[max_overlaps < self.neg_iou_thr] = 0
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = argmax_overlaps[positive] + 1
        if self.match_low_quality:
            gt_max_overlaps = overlaps.max(dim=1).values  # [G]
            best = (overlaps == gt_max_overlaps[:, None]) & (gt_max_overlaps[:, None] >= self.min_pos_iou)
            # The last gt (in index order) that claims a candidate wins, as in mmdet's loop over gts.
            ranks = torch.arange(1, num_gts + 1, device=boxes.device)[:, None]
            claimed = best.any(dim=0)
            gt_inds[claimed] = (best * ranks).amax(dim=0)[claimed]
        return AssignResult(gt_inds, max_overlaps)


class RandomSampler:
    """Draws a fixed-size, class-balanced random subset of assigned candidates (rules above)."""

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: float = -1, add_gt_as_proposals: bool = True) -> None:
        if num < 1:
            raise ValueError(f"num must be positive, got {num}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must lie in [0, 1], got {pos_fraction}")
        self.num = num
        self.pos_fraction = pos_fraction
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals

    @torch.no_grad()
    def __call__(
        self, assign: AssignResult, boxes: Tensor, gt_boxes: Tensor, generator: torch.Generator | None = None
    ) -> SamplingResult:
        """Sample from ``boxes [N,4]`` assigned by ``assign`` to ``gt_boxes [G,4]``.

        ``generator`` (a CPU generator) makes the draw reproducible; the global RNG is used otherwise.
        """
        gt_inds = assign.gt_inds
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if self.add_gt_as_proposals and gt_boxes.shape[0] > 0:
            num_gts = gt_boxes.shape[0]
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes])
            gt_inds = torch.cat([torch.arange(1, num_gts + 1, device=gt_inds.device), gt_inds])
            is_gt = torch.cat([torch.ones(num_gts, dtype=torch.bool, device=boxes.device), is_gt])
        pos_inds = self._choose(torch.nonzero(gt_inds > 0).squeeze(1), int(self.num * self.pos_fraction), generator)
        num_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        neg_inds = self._choose(torch.nonzero(gt_inds == 0).squeeze(1), num_neg, generator)
        return SamplingResult(boxes, pos_inds, neg_inds, gt_inds[pos_inds] - 1, is_gt[pos_inds])

    @staticmethod
    def _choose(candidates: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
        """At most ``num`` of the (sorted) ``candidates``, uniformly at random, sorted."""
        if candidates.numel() <= num:
            return candidates
        perm = torch.randperm(candidates.numel(), generator=generator)[:num].to(candidates.device)
        return candidates[perm].sort().values
