"""Cascade RoI heads: RoI extraction against torchvision, box head layout, each loss by hand, refinement,
test-time score averaging and mask merging, gradients and determinism."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, roi_align
from torchvision.ops.poolers import LevelMapper

from segscope.models.cascade_rcnn.roi_heads import CascadeRoIHeads, ConvFCBBoxHead, SingleRoIExtractor
from segscope.models.cascade_rcnn.sampling import SamplingResult

STRIDES = (4, 8, 16, 32)
PADDED = (128, 192)
IMAGE_SIZES = [(128, 192), (100, 150)]
NUM_CLASSES = 3


def _features(channels: int = 8, seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    """P2-P6 of a ``batch``-image 128x192 padded batch."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, PADDED[0] // s, PADDED[1] // s, generator=generator) for s in STRIDES + (64,)]


def _boxes(num: int, seed: int, min_side: float = 4.0, max_side: float = 120.0) -> torch.Tensor:
    """``[num,4]`` boxes with sides in ``[min_side, max_side)`` inside the 128x192 canvas."""
    generator = torch.Generator().manual_seed(seed)
    wh = min_side + torch.rand(num, 2, generator=generator) * (max_side - min_side)
    xy = torch.rand(num, 2, generator=generator) * (torch.tensor([192.0, 128.0]) - wh).clamp(min=0)
    return torch.cat([xy, xy + wh], dim=1)


def _targets() -> list[dict[str, torch.Tensor]]:
    masks0 = torch.zeros(2, *PADDED)
    masks0[0, 30:100, 20:90] = 1
    masks0[1, 40:120, 100:180] = 1
    masks1 = torch.zeros(1, *PADDED)
    masks1[0, 10:50, 10:60] = 1
    return [
        {
            "boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0], [100.0, 40.0, 180.0, 120.0]]),
            "labels": torch.tensor([0, 1]),
            "masks": masks0,
        },
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2]), "masks": masks1},
    ]


def _proposals() -> list[torch.Tensor]:
    """Jittered copies of the gt boxes (so that every stage has positives) and random boxes."""
    generator = torch.Generator().manual_seed(3)
    result = []
    for target, seed in zip(_targets(), (4, 5)):
        near = target["boxes"].repeat(10, 1) + torch.randn(10 * len(target["boxes"]), 4, generator=generator) * 3
        result.append(torch.cat([near, _boxes(40, seed)]))
    return result


def _heads(**kwargs: object) -> CascadeRoIHeads:
    torch.manual_seed(0)
    return CascadeRoIHeads(NUM_CLASSES, 8, conv_out_channels=8, fc_out_channels=16, num_samples=64, **kwargs)


def test_level_mapping_by_hand_and_against_torchvision_level_mapper() -> None:
    extractor = SingleRoIExtractor(7)
    sides = torch.tensor([10.0, 56.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 1000.0])
    squares = torch.stack([torch.zeros(9), torch.zeros(9), sides, sides], dim=1)
    assert extractor.map_levels(squares).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    # torchvision: floor(4 + log2(s / 224) + 1e-6) in [2, 5]; mmdet: floor(log2(s / 56 + 1e-6)) in [0, 3].
    # The same rule shifted by 2, except within ~1e-6 of a level boundary (where the eps enters differently).
    boxes = _boxes(500, seed=0, min_side=2.0, max_side=600.0)
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    away = (torch.log2(scale / 56) - torch.log2(scale / 56).round()).abs() > 1e-4
    theirs = LevelMapper(2, 5)([boxes])  # already minus k_min
    assert torch.equal(extractor.map_levels(boxes)[away], theirs[away])
    assert len(extractor.map_levels(boxes).unique()) == 4


def test_pooled_features_are_aligned_roi_align_on_the_mapped_level() -> None:
    features = _features()
    extractor = SingleRoIExtractor(7)
    # Boxes may reach past the canvas (RoIAlign reads zeros there), so that all four levels occur.
    generator = torch.Generator().manual_seed(1)
    corner = torch.rand(60, 2, generator=generator) * 150
    boxes = torch.cat([corner, corner + 2 + torch.rand(60, 2, generator=generator) * 600], dim=1)
    rois = torch.cat([torch.arange(60)[:, None] % 2, boxes], dim=1).float()
    pooled = extractor(features, rois)
    levels = extractor.map_levels(boxes)
    assert pooled.shape == (60, 8, 7, 7) and len(levels.unique()) == 4
    for i in range(60):
        level = int(levels[i])
        expected = roi_align(features[level], rois[i : i + 1], 7, 1 / STRIDES[level], 0, aligned=True)
        torch.testing.assert_close(pooled[i : i + 1], expected)


def test_pooled_features_match_multiscale_roi_align_on_boxes_shifted_by_half_a_stride() -> None:
    # MultiScaleRoIAlign pools with aligned=False: it neither subtracts half a cell (0.5 / scale px) from
    # the box nor lets a box be smaller than one cell. For boxes of at least one cell, aligned pooling of
    # a box equals unaligned pooling of the box moved up-left by half its level's stride.
    features = _features()
    extractor = SingleRoIExtractor(7)
    boxes = _boxes(40, seed=2, min_side=33.0, max_side=125.0)
    shift = torch.tensor(STRIDES, dtype=torch.float32)[extractor.map_levels(boxes)][:, None] / 2
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0)
    named = OrderedDict((str(i), f[:1]) for i, f in enumerate(features[:4]))
    expected = pooler(named, [boxes - shift], [PADDED])
    ours = extractor(features, torch.cat([torch.zeros(40, 1), boxes], dim=1))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    unshifted = pooler(named, [boxes], [PADDED])
    assert not torch.allclose(ours, unshifted, atol=1e-3)


def test_box_head_layout_and_outputs() -> None:
    head = ConvFCBBoxHead(NUM_CLASSES, 8, conv_out_channels=8, fc_out_channels=16)
    keys = set(head.state_dict())
    assert {"shared_convs.3.conv.weight", "shared_convs.3.bn.running_var", "shared_fcs.0.weight", "fc_cls.bias"} <= keys
    assert "shared_convs.0.conv.bias" not in keys and head.shared_fcs[0].in_features == 8 * 49
    cls, deltas = head(torch.randn(5, 8, 7, 7))
    assert cls.shape == (5, NUM_CLASSES + 1) and deltas.shape == (5, 4 * NUM_CLASSES)
    agnostic = ConvFCBBoxHead(NUM_CLASSES, 8, conv_out_channels=8, fc_out_channels=16, reg_class_agnostic=True)
    assert agnostic(torch.randn(5, 8, 7, 7))[1].shape == (5, 4)


def test_training_losses_backward_reaches_every_parameter_and_are_seeded() -> None:
    heads = _heads().train()
    features = [f.requires_grad_() for f in _features()]
    losses = heads(features, _proposals(), IMAGE_SIZES, _targets(), torch.Generator().manual_seed(0))
    names = [f"loss_{kind}_s{i}" for i in range(3) for kind in ("cls", "bbox", "mask")]
    assert sorted(losses) == sorted(names) and all(v.isfinite() and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    # The RoIs of this small canvas reach P2 and P3 only; P6 is never read.
    assert all(f.grad is not None for f in features[:2]) and features[4].grad is None
    again = heads(_features(), _proposals(), IMAGE_SIZES, _targets(), torch.Generator().manual_seed(0))
    other = heads(_features(), _proposals(), IMAGE_SIZES, _targets(), torch.Generator().manual_seed(1))
    assert all(torch.equal(losses[k].detach(), again[k].detach()) for k in names)
    assert any(not torch.equal(losses[k].detach(), other[k].detach()) for k in names)


def test_classification_and_mask_losses_by_hand_with_constant_logits() -> None:
    heads = _heads().train()
    weights = (1.0, 0.5, 0.25)
    with torch.no_grad():
        for box_head, mask_head in zip(heads.bbox_head, heads.mask_head):
            box_head.fc_cls.weight.zero_()
            box_head.fc_cls.bias.zero_()
            mask_head.conv_logits.weight.zero_()
            mask_head.conv_logits.bias.zero_()
    losses = heads(_features(), _proposals(), IMAGE_SIZES, _targets(), torch.Generator().manual_seed(0))
    for stage, weight in enumerate(weights):
        # Uniform logits over C + 1 classes and zero mask logits: log(C + 1) and log 2 per element.
        assert losses[f"loss_cls_s{stage}"].item() == pytest.approx(weight * math.log(NUM_CLASSES + 1), rel=1e-5)
        assert losses[f"loss_mask_s{stage}"].item() == pytest.approx(weight * math.log(2), rel=1e-5)


@pytest.mark.parametrize("agnostic", [False, True])
def test_box_loss_by_hand_decodes_the_gt_class_deltas_and_averages_over_all_sampled_rois(agnostic: bool) -> None:
    heads = _heads(reg_class_agnostic=agnostic)
    rois = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0], [0.0, 50.0, 50.0, 60.0, 60.0], [1.0, 0.0, 0.0, 20.0, 20.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 40.0, 20.0]])
    labels = torch.tensor([1, NUM_CLASSES, 2])
    deltas = torch.zeros(3, 4 if agnostic else 4 * NUM_CLASSES)
    if not agnostic:
        deltas[0, :4] = 5.0  # another class's deltas: unused
    # Undecoded RoI 0 vs its gt: IoU 1/2, the enclosing box is the union: GIoU 1/2.
    # RoI 2 regressed to [0, 0, 40, 20] by dx = 0.5 / 0.1 and dw = log 2 / 0.2 (stage 0 stds): GIoU 1.
    deltas[2, -4:] = torch.tensor([5.0, 0.0, math.log(2) / 0.2, 0.0])
    loss = heads._box_loss(0, rois, deltas, labels, gt)
    assert loss.item() == pytest.approx(10 * (0.5 + 0.0) / 3, rel=1e-5)
    # No positives: zero, with a graph.
    none = heads._box_loss(0, rois, deltas.requires_grad_(), torch.full((3,), NUM_CLASSES), gt)
    assert none.item() == 0 and none.requires_grad


def test_refinement_decodes_with_the_label_clips_and_drops_the_added_gt_boxes() -> None:
    heads = _heads()
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 40.0, 40.0], [90.0, 0.0, 100.0, 10.0]]
    )
    # Image 0: rows 0 (an added gt) and 1 positive, 2 negative; image 1: row 3 negative.
    samples = [
        SamplingResult(
            boxes[:3], torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([0, 0]), torch.tensor([True, False])
        ),
        SamplingResult(
            boxes[3:],
            torch.zeros(0, dtype=torch.long),
            torch.tensor([0]),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.bool),
        ),
    ]
    rois = torch.cat([torch.tensor([[0.0], [0.0], [0.0], [1.0]]), boxes], dim=1)
    labels = torch.tensor([0, 2, NUM_CLASSES, NUM_CLASSES])
    cls_logits = torch.zeros(4, NUM_CLASSES + 1)
    cls_logits[2, 1] = 1.0  # negative -> its best foreground class, 1
    cls_logits[3, 0] = 1.0
    cls_logits[3, -1] = 9.0  # the background column is ignored: class 0
    deltas = torch.zeros(4, 4 * NUM_CLASSES)
    deltas[1, 8] = 1.0  # class 2: dx = 0.1 * 10 px
    deltas[2, 5] = 1.0  # class 1: dy = 0.1 * 20 px
    deltas[3, 0] = 10.0  # class 0: dx = 1 * 10 px, clipped at width 95
    refined = heads._refine(0, rois, cls_logits, deltas, labels, samples, [(128, 192), (50, 95)])
    torch.testing.assert_close(refined[0], torch.tensor([[6.0, 5.0, 16.0, 15.0], [20.0, 22.0, 40.0, 42.0]]))
    torch.testing.assert_close(refined[1], torch.tensor([[95.0, 0.0, 95.0, 10.0]]))


def test_test_time_averages_logits_over_stages_and_mask_probabilities_over_heads() -> None:
    heads = _heads().eval()
    stage_bias = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [0.0, 1.0, 0.0, 2.0]])
    mask_bias = (-2.0, 0.0, 3.0)
    with torch.no_grad():
        for head, bias in zip(heads.bbox_head, stage_bias):
            head.fc_cls.weight.zero_()
            head.fc_cls.bias.copy_(bias)
            head.fc_reg.weight.zero_()
        for head, mbias in zip(heads.mask_head, mask_bias):
            head.conv_logits.weight.zero_()
            head.conv_logits.bias.fill_(mbias)
    proposals = [_boxes(30, seed=7, min_side=10.0), torch.tensor([[100.0, 90.0, 170.0, 140.0]])]
    results = heads(_features(), proposals, IMAGE_SIZES)
    # Averaged logits (1, 0, 2) -> softmax; averaging probabilities would give other scores.
    probs = torch.softmax(stage_bias.mean(dim=0), dim=0)
    expected_mask = sum(torch.sigmoid(torch.tensor(b)) for b in mask_bias) / 3
    boxes, scores, labels, masks = results[0]
    # Every class over 0.05 survives; without regression the boxes are the proposals, NMS per class.
    keep = batched_nms(proposals[0], torch.ones(30), torch.zeros(30, dtype=torch.long), 0.5)
    assert len(boxes) == 3 * len(keep)
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    torch.testing.assert_close(scores, probs[labels])
    for label in range(3):
        torch.testing.assert_close(boxes[labels == label].sort(dim=0).values, proposals[0][keep].sort(dim=0).values)
    assert masks.shape == (len(boxes), 28, 28)
    torch.testing.assert_close(masks, expected_mask.expand_as(masks))
    # Image 1: its one proposal is clipped to the 100x150 image.
    boxes1, _, labels1, masks1 = results[1]
    torch.testing.assert_close(boxes1, clip_boxes_to_image(proposals[1], (100, 150)).expand(3, 4))
    assert masks1.shape == (3, 28, 28)


def test_test_time_output_shapes_threshold_and_top_k() -> None:
    heads = _heads(reg_class_agnostic=True).eval()
    proposals = [_boxes(300, seed=8), _boxes(5, seed=9)]
    results = heads(_features(), proposals, IMAGE_SIZES)
    for (boxes, scores, labels, masks), (height, width) in zip(results, IMAGE_SIZES):
        assert boxes.shape[0] == scores.shape[0] == labels.shape[0] == masks.shape[0] <= 100
        assert (scores > 0.05).all() and torch.equal(scores, scores.sort(descending=True).values)
        assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all() and (boxes >= 0).all()
        assert ((masks >= 0) & (masks <= 1)).all()
    assert results[0][0].shape[0] == 100
    empty = heads(_features(), [torch.zeros(0, 4), _boxes(3, seed=1)], IMAGE_SIZES)
    assert empty[0][0].shape == (0, 4) and empty[0][3].shape == (0, 28, 28)
