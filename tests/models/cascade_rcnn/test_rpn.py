"""Region proposal network: torchvision parity of head + proposals + loss formula, mmdet's rules by hand."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.models.detection.rpn import concat_box_prediction_layers

from segscope.models.cascade_rcnn.anchors import AnchorGenerator
from segscope.models.cascade_rcnn.fpn import FPN
from segscope.models.cascade_rcnn.rpn import ProposalConfig, RegionProposalNetwork
from segscope.models.cascade_rcnn.sampling import RandomSampler

STRIDES = (4, 8, 16, 32, 64)
PADDED = (128, 192)
IMAGE_SIZES = [(128, 192), (100, 150)]
TARGETS = [
    {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0], [100.0, 40.0, 180.0, 120.0]]), "labels": torch.tensor([0, 1])},
    {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
]


def _features(channels: int, seed: int) -> list[torch.Tensor]:
    """A 2-image pyramid of a 128x192 padded batch, strides 4 to 64."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, PADDED[0] // s, PADDED[1] // s, generator=generator) for s in STRIDES]


def _rpn(channels: int = 8, weight_std: float = 0.1, **kwargs: object) -> RegionProposalNetwork:
    """An RPN whose head has larger weights than its init, so that deltas and scores spread out."""
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(channels, channels, **kwargs)
    for conv in (rpn.head.rpn_conv, rpn.head.rpn_cls, rpn.head.rpn_reg):
        torch.nn.init.normal_(conv.weight, std=weight_std)
        torch.nn.init.normal_(conv.bias, std=weight_std)
    return rpn


def _torchvision_rpn(ours: RegionProposalNetwork, nms_pre: int, max_per_img: int) -> TVRegionProposalNetwork:
    """torchvision's RPN with our head weights, our unrounded cell anchors and matching settings."""
    generator = TVAnchorGenerator(sizes=tuple((8 * s,) for s in STRIDES), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    generator.cell_anchors = [a.clone() for a in ours.anchor_generator.base_anchors]
    head = TVRPNHead(ours.head.rpn_conv.in_channels, 3)
    for theirs, mine in ((head.conv[0][0], ours.head.rpn_conv), (head.cls_logits, ours.head.rpn_cls)):
        theirs.load_state_dict(mine.state_dict())
    head.bbox_pred.load_state_dict(ours.head.rpn_reg.state_dict())
    top_n = {"training": nms_pre, "testing": nms_pre}
    kept = {"training": max_per_img, "testing": max_per_img}
    # Matcher (0.7, 0.3); a sampler large enough to take every candidate; NMS at 0.7; no score threshold.
    return TVRegionProposalNetwork(generator, head, 0.7, 0.3, 10**6, 0.5, top_n, kept, nms_thresh=0.7, score_thresh=0.0)


def test_proposals_match_torchvision_rpn_with_the_same_weights_and_anchors() -> None:
    # torchvision drops boxes under 1e-3 px (anchors over the second image's padding clip to zero width);
    # mmdet 2.11 keeps them at min_bbox_size 0, so the same 1e-3 is set here.
    config = ProposalConfig(nms_pre=60, max_per_img=40, min_bbox_size=1e-3)
    ours = _rpn(test_proposals=config).eval()
    theirs = _torchvision_rpn(ours, nms_pre=60, max_per_img=40).eval()
    features = _features(8, seed=1)
    with torch.no_grad():
        proposals, losses = ours(features, IMAGE_SIZES)
        expected, _ = theirs(ImageList(torch.zeros(2, 3, *PADDED), IMAGE_SIZES), OrderedDict(enumerate(features)))
        _, deltas = ours.head(features)
    assert losses == {}
    # mmdet also clamps dw, dh from below (at -4.135), torchvision does not: the deltas stay clear of it.
    assert max(d.abs().max() for d in deltas) < 4
    for mine, ref, (height, width) in zip(proposals, expected, IMAGE_SIZES):
        assert mine.shape == (40, 4)
        assert mine[:, 0::2].max() <= width and mine[:, 1::2].max() <= height and mine.min() >= 0
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-4)


def test_selection_takes_nms_pre_per_level_then_nms_within_each_level_and_clips() -> None:
    rpn = RegionProposalNetwork(4, 4)
    level0 = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=torch.float32)
    level1 = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.5], [60, 0, 70, 10]], dtype=torch.float32)
    levels = [
        (torch.tensor([[2.0, 1.0, 3.0]]), torch.zeros(1, 3, 4)),
        (torch.tensor([[0.5, -1.0, -2.0]]), torch.zeros(1, 3, 4)),
    ]
    anchors, size = [level0, level1], [(55, 58)]
    proposals = rpn.select_proposals(levels, anchors, size, ProposalConfig(nms_pre=3, max_per_img=10))[0]
    # [50, 60] is clipped to the 58 x 55 image; level 1's copy of [0, 0, 10, 10] survives the level-0 one
    # (NMS per level), its 10.5-high box (IoU 0.95) does not; [60, 70] clips to zero width and is kept
    # (mmdet 2.11: min_bbox_size 0 filters nothing).
    expected = torch.tensor(
        [[50, 50, 58, 55], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [58, 0, 58, 10]], dtype=torch.float32
    )
    torch.testing.assert_close(proposals, expected)
    # nms_pre per level: the 20..30 box (level 0's third) and the zero-width box (level 1's third) go.
    top2 = rpn.select_proposals(levels, anchors, size, ProposalConfig(nms_pre=2, max_per_img=10))[0]
    torch.testing.assert_close(top2, expected[[0, 1, 3]])
    capped = rpn.select_proposals(levels, anchors, size, ProposalConfig(nms_pre=3, max_per_img=2))[0]
    torch.testing.assert_close(capped, expected[:2])
    # min_bbox_size keeps boxes at least that wide and high (mmdet 2.11's >=).
    sized = rpn.select_proposals(levels, anchors, size, ProposalConfig(nms_pre=3, max_per_img=10, min_bbox_size=5))
    torch.testing.assert_close(sized[0], expected[:4])


def _smooth_l1(x: float, beta: float = 1 / 9) -> float:
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def _single_level_rpn() -> RegionProposalNetwork:
    """One level of 32x32 anchors at stride 16: on a 4x4 map of a 64x64 image, the anchors of cells
    (x, y) in {1, 2}^2 (indices 5, 6, 9, 10) lie inside the image, the 12 others cross its border."""
    return RegionProposalNetwork(4, 4, anchor_generator=AnchorGenerator(strides=(16,), ratios=(1.0,), scales=(2.0,)))


def test_loss_of_a_hand_assigned_case() -> None:
    rpn = _single_level_rpn()
    anchors = torch.cat(rpn.anchor_generator.grid_anchors([(4, 4)]))
    inside = torch.tensor([[0, 0, 32, 32], [16, 0, 48, 32], [0, 16, 32, 48], [16, 16, 48, 48]], dtype=torch.float32)
    torch.testing.assert_close(anchors[[5, 6, 9, 10]], inside)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 16, generator=generator, requires_grad=True)
    deltas = (torch.randn(1, 16, 4, generator=generator) * 0.1).requires_grad_()
    gt = torch.tensor([[2.0, 0.0, 34.0, 30.0]])
    # IoUs: anchor 5: 900/1084 (positive), 6: 540/1444 = 0.37 (ignored), 9: 420/1564 and 10: 252/1732 (negative).
    losses = rpn.losses(logits, deltas, anchors, [(64, 64)], [{"boxes": gt, "labels": torch.tensor([0])}])
    l = logits[0].tolist()
    avg_factor = 1 + 2
    expected_cls = (math.log1p(math.exp(-l[5])) + math.log1p(math.exp(l[9])) + math.log1p(math.exp(l[10]))) / avg_factor
    target = [(18 - 16) / 32, (15 - 16) / 32, 0.0, math.log(30 / 32)]
    expected_bbox = sum(_smooth_l1(d - t) for d, t in zip(deltas[0, 5].tolist(), target)) / avg_factor
    assert losses["loss_rpn_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_rpn_bbox"].item() == pytest.approx(expected_bbox, rel=1e-5)
    sum(losses.values()).backward()
    assert set(torch.nonzero(logits.grad[0]).squeeze(1).tolist()) == {5, 9, 10}
    assert set(torch.nonzero(deltas.grad[0].abs().sum(1)).squeeze(1).tolist()) == {5}


def test_loss_without_positives_or_objects_divides_by_one_plus_the_negatives() -> None:
    rpn = _single_level_rpn()
    anchors = torch.cat(rpn.anchor_generator.grid_anchors([(4, 4)]))
    logits, deltas = torch.randn(1, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(1, 16, 4)
    # A 4x4 gt: its best inside anchor has IoU 16/1024 < min_pos_iou 0.3, so all 4 inside anchors are negative.
    target = {"boxes": torch.tensor([[40.0, 40.0, 44.0, 44.0]]), "labels": torch.tensor([0])}
    expected = sum(math.log1p(math.exp(logits[0, i].item())) for i in (5, 6, 9, 10)) / (1 + 4)
    # An image without objects is all negative as well.
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    for image_target in (target, empty):
        losses = rpn.losses(logits, deltas, anchors, [(64, 64)], [image_target])
        assert losses["loss_rpn_cls"].item() == pytest.approx(expected, rel=1e-5)
        assert losses["loss_rpn_bbox"].item() == 0.0


def test_losses_equal_torchvision_compute_loss_on_the_same_assignment() -> None:
    ours = _rpn(sampler=RandomSampler(100000, 0.5, add_gt_as_proposals=False)).train()
    theirs = _torchvision_rpn(ours, nms_pre=2000, max_per_img=2000).train()
    features = _features(8, seed=2)
    _, losses = ours(features, IMAGE_SIZES, TARGETS)
    # torchvision's matcher differs (no border exclusion, low-quality rule), so give it mmdet's labels:
    # 1 positive, 0 negative, -1 ignored or outside the image; every candidate is sampled by both.
    anchors = torch.cat(ours.anchor_generator.grid_anchors([f.shape[-2:] for f in features]))
    labels, regression_targets = [], []
    for (height, width), target in zip(IMAGE_SIZES, TARGETS):
        inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < width) & (anchors[:, 3] < height)
        gt_inds = torch.full((anchors.shape[0],), -1)
        gt_inds[inside] = ours.assigner(anchors[inside], target["boxes"]).gt_inds
        labels.append(torch.where(gt_inds > 0, 1.0, torch.where(gt_inds == 0, 0.0, -1.0)))
        matched = target["boxes"][(gt_inds - 1).clamp(min=0)]
        regression_targets.append(theirs.box_coder.encode_single(matched, anchors))
        assert (gt_inds > 0).sum() > 0 and (gt_inds == 0).sum() > 0
    objectness, deltas = concat_box_prediction_layers(*theirs.head(features))
    loss_objectness, loss_box = theirs.compute_loss(objectness, deltas, labels, regression_targets)
    torch.testing.assert_close(losses["loss_rpn_cls"], loss_objectness, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_rpn_bbox"], loss_box, rtol=1e-5, atol=1e-6)


def test_training_samples_reproducibly_uses_the_training_config_and_needs_targets() -> None:
    rpn = _rpn(
        weight_std=0.01,
        train_proposals=ProposalConfig(nms_pre=300, max_per_img=120),
        test_proposals=ProposalConfig(nms_pre=100, max_per_img=30),
        sampler=RandomSampler(32, 0.5, add_gt_as_proposals=False),
    )
    features = _features(8, seed=3)
    with torch.no_grad():
        proposals, losses = rpn.train()(features, IMAGE_SIZES, TARGETS, torch.Generator().manual_seed(0))
        _, again = rpn(features, IMAGE_SIZES, TARGETS, torch.Generator().manual_seed(0))
        _, other = rpn(features, IMAGE_SIZES, TARGETS, torch.Generator().manual_seed(5))
        assert [len(p) for p in proposals] == [120, 120]
        assert losses == again and losses["loss_rpn_cls"] != other["loss_rpn_cls"]
        with pytest.raises(ValueError, match="target"):
            rpn(features, IMAGE_SIZES)
        assert [len(p) for p in rpn.eval()(features, IMAGE_SIZES)[0]] == [30, 30]


def test_losses_backpropagate_through_head_and_fpn() -> None:
    # 576 px: every level, up to the 512 px anchors of P6, has anchors inside the image, and all of
    # those are sampled, so that every FPN conv receives a gradient.
    torch.manual_seed(0)
    fpn = FPN((4, 8, 8, 8), out_channels=8, num_outs=5)
    rpn = RegionProposalNetwork(8, 8, sampler=RandomSampler(10**6, 0.5, add_gt_as_proposals=False)).train()
    generator = torch.Generator().manual_seed(4)
    inputs = [
        torch.randn(1, c, 576 // s, 576 // s, generator=generator, requires_grad=True)
        for c, s in zip((4, 8, 8, 8), STRIDES)
    ]
    boxes = torch.tensor([[40.0, 60.0, 500.0, 520.0], [100.0, 100.0, 140.0, 130.0]])
    target = {"boxes": boxes, "labels": torch.tensor([0, 1])}
    proposals, losses = rpn(fpn(inputs), [(576, 576)], [target])
    assert not any(p.requires_grad for p in proposals)
    assert losses["loss_rpn_cls"] > 0 and losses["loss_rpn_bbox"] > 0
    sum(losses.values()).backward()
    for name, parameter in [*fpn.named_parameters(), *rpn.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert all(x.grad.abs().sum() > 0 for x in inputs)


def test_head_names_shapes_and_init_follow_mmdet() -> None:
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(256, 256)
    shapes = {name: tuple(p.shape) for name, p in rpn.state_dict().items()}
    assert shapes == {
        "head.rpn_conv.weight": (256, 256, 3, 3),
        "head.rpn_conv.bias": (256,),
        "head.rpn_cls.weight": (3, 256, 1, 1),
        "head.rpn_cls.bias": (3,),
        "head.rpn_reg.weight": (12, 256, 1, 1),
        "head.rpn_reg.bias": (12,),
    }
    assert rpn.head.rpn_conv.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert all(torch.count_nonzero(c.bias) == 0 for c in (rpn.head.rpn_conv, rpn.head.rpn_cls, rpn.head.rpn_reg))
