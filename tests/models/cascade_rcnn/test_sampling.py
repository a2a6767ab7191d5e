"""MaxIoUAssigner and RandomSampler: mmdet 2.x's assignment steps and sampling counts."""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from segscope.models.cascade_rcnn.sampling import AssignResult, MaxIoUAssigner, RandomSampler

GT = torch.tensor(
    [
        [0, 0, 10, 10],
        [100, 100, 110, 110],
        [200, 200, 210, 210],
        [300, 300, 340, 310],
        [300, 300, 310, 310],
        [400, 400, 410, 410],
        [400, 400, 410, 410],
    ],
    dtype=torch.float32,
)
BOXES = torch.tensor(
    [
        [0, 0, 10, 10],  # IoU 1 with gt 0
        [0, 0, 10, 8],  # 0.8 with gt 0
        [0, 0, 10, 5],  # 0.5 with gt 0: between the thresholds
        [50, 50, 60, 60],  # overlaps nothing
        [0, 0, 10, 2],  # 0.2 with gt 0
        [100, 100, 110, 104],  # 0.4 with gt 1, its best box ...
        [100, 106, 110, 110],  # ... tied with this one
        [200, 200, 210, 202],  # 0.2 with gt 2, its best box, but below min_pos_iou
        [300, 300, 313, 310],  # 0.325 with gt 3 (its best box), 0.769 with gt 4
        [300, 300, 310, 310],  # 1 with gt 4, 0.25 with gt 3
        [400, 400, 410, 412],  # 0.833 with gts 5 and 6 (the same box twice)
    ],
    dtype=torch.float32,
)


def test_rpn_assignment_follows_mmdet_steps_including_low_quality_overrides() -> None:
    result = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True)(BOXES, GT)
    # Box 8's best gt is 4, but it is gt 3's best box: the low-quality step gives it to gt 3 (index 4).
    # Box 10 is the best box of gts 5 and 6: the later gt wins (index 7).
    assert result.gt_inds.tolist() == [1, 1, -1, 0, 0, 2, 2, 0, 4, 5, 7]
    torch.testing.assert_close(result.max_overlaps[[0, 2, 3, 8]], torch.tensor([1.0, 0.5, 0.0, 100 / 130]))


def test_roi_stage_assignment_has_no_low_quality_matches() -> None:
    result = MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5, match_low_quality=False)(BOXES, GT)
    assert result.gt_inds.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 5, 5, 6]


def test_thresholds_are_half_open() -> None:
    # IoU exactly at neg_iou_thr is not negative (ignored); exactly at pos_iou_thr is positive.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 7.5], [0.0, 0.0, 10.0, 4.0]])
    result = MaxIoUAssigner(0.75, 0.5, match_low_quality=False)(boxes, GT[:1])
    assert result.gt_inds.tolist() == [-1, 1, 0]


def test_empty_inputs() -> None:
    assigner = MaxIoUAssigner(0.7, 0.3)
    assert assigner(BOXES, torch.zeros(0, 4)).gt_inds.tolist() == [0] * len(BOXES)
    assert assigner(torch.zeros(0, 4), GT).gt_inds.numel() == 0


def test_assignment_matches_torchvision_matcher_when_every_box_overlaps_at_most_one_gt() -> None:
    generator = torch.Generator().manual_seed(0)
    # Gts 300 px apart; boxes within 60 px of their gt never reach another one.
    corners = torch.tensor([[0.0, 0.0], [300.0, 0.0], [0.0, 300.0], [300.0, 300.0]])
    gt = torch.cat([corners, corners + 30 + torch.rand(4, 2, generator=generator) * 30], dim=1)
    near = gt.repeat_interleave(60, dim=0) + (torch.rand(240, 4, generator=generator) - 0.5) * 40
    boxes = torch.cat([near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 2)], dim=1)
    ours = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True)(boxes, gt).gt_inds
    iou = box_iou(gt, boxes)
    assert iou.max(dim=1).values.min() >= 0.3  # every gt has a box to match with low quality
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    # torchvision: -1 below the low threshold, -2 between; mmdet: 0 negative, -1 ignored, gt index + 1.
    expected = torch.where(matches >= 0, matches + 1, torch.where(matches == -1, 0, -1))
    assert (ours > 0).sum() > 4 and (ours == 0).sum() > 0 and (ours == -1).sum() > 0
    assert ((ours > 0) & (iou.max(dim=0).values < 0.7)).any()  # a low-quality match is among them
    assert torch.equal(ours, expected)


def _assignment(num_pos: int, num_neg: int, num_ignored: int, seed: int = 0) -> AssignResult:
    """A shuffled assignment of ``num_pos`` positives (gt 0 or 1), negatives and ignored candidates."""
    gt_inds = torch.cat([torch.arange(num_pos) % 2 + 1, torch.zeros(num_neg), -torch.ones(num_ignored)]).long()
    gt_inds = gt_inds[torch.randperm(gt_inds.numel(), generator=torch.Generator().manual_seed(seed))]
    return AssignResult(gt_inds, torch.zeros(gt_inds.numel()))


def test_sampler_draws_balanced_sorted_subsets_reproducibly() -> None:
    assign = _assignment(300, 1000, 50)
    boxes = torch.rand(1350, 4)
    sampler = RandomSampler(256, 0.5, add_gt_as_proposals=False)
    first = sampler(assign, boxes, torch.zeros(2, 4), torch.Generator().manual_seed(1))
    again = sampler(assign, boxes, torch.zeros(2, 4), torch.Generator().manual_seed(1))
    other = sampler(assign, boxes, torch.zeros(2, 4), torch.Generator().manual_seed(2))
    assert first.pos_inds.numel() == 128 and first.neg_inds.numel() == 128
    assert (assign.gt_inds[first.pos_inds] > 0).all() and (assign.gt_inds[first.neg_inds] == 0).all()
    assert torch.equal(first.pos_inds, first.pos_inds.sort().values) and first.pos_inds.unique().numel() == 128
    assert torch.equal(first.pos_inds, again.pos_inds) and torch.equal(first.neg_inds, again.neg_inds)
    assert not torch.equal(first.pos_inds, other.pos_inds)
    assert torch.equal(first.pos_assigned_gt_inds, assign.gt_inds[first.pos_inds] - 1)
    assert torch.equal(first.pos_boxes, boxes[first.pos_inds]) and not first.pos_is_gt.any()


def test_sampler_fills_with_negatives_and_honours_neg_pos_ub() -> None:
    assign = _assignment(10, 1000, 0)
    boxes = torch.rand(1010, 4)
    sample = RandomSampler(256, 0.5, add_gt_as_proposals=False)(assign, boxes, torch.zeros(2, 4))
    assert sample.pos_inds.numel() == 10 and sample.neg_inds.numel() == 246
    capped = RandomSampler(256, 0.5, neg_pos_ub=3, add_gt_as_proposals=False)(assign, boxes, torch.zeros(2, 4))
    assert capped.neg_inds.numel() == 30
    no_pos = RandomSampler(256, 0.5, neg_pos_ub=3, add_gt_as_proposals=False)(_assignment(0, 50, 0), boxes[:50], GT)
    assert no_pos.pos_inds.numel() == 0 and no_pos.neg_inds.numel() == 3


def test_sampler_puts_gt_boxes_first_as_positives_when_asked() -> None:
    assign = _assignment(4, 700, 5)
    boxes = torch.rand(709, 4)
    gt = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    sample = RandomSampler(512, 0.25, add_gt_as_proposals=True)(assign, boxes, gt, torch.Generator().manual_seed(0))
    assert sample.boxes.shape == (711, 4) and torch.equal(sample.boxes[:2], gt)
    assert sample.pos_inds.tolist()[:2] == [0, 1] and sample.pos_inds.numel() == 6
    assert sample.pos_is_gt.tolist() == [True, True, False, False, False, False]
    assert sample.pos_assigned_gt_inds[:2].tolist() == [0, 1]
    assert sample.neg_inds.numel() == 512 - 6 and (sample.neg_inds >= 2).all()
