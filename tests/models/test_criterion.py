from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from segscope.config import Mask2FormerConfig
from segscope.models.mask2former import criterion as criterion_module
from segscope.models.mask2former.criterion import SetCriterion, total_loss
from segscope.models.mask2former.matcher import HungarianMatcher, Target

NUM_CLASSES = 3
WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


@dataclass
class Outputs:
    """Stands in for the model's ``Mask2FormerOutput``."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux_outputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _criterion(num_points: int = 512, importance_sample_ratio: float = 0.75) -> SetCriterion:
    return SetCriterion(
        NUM_CLASSES,
        HungarianMatcher(num_points=num_points),
        num_points=num_points,
        importance_sample_ratio=importance_sample_ratio,
    )


def _block_targets(size: tuple[int, int] = (64, 64)) -> Target:
    """Two segments whose edges lie on the stride-4 grid."""
    masks = torch.zeros(2, *size, dtype=torch.bool)
    masks[0, :32, :32] = True
    masks[1, 32:, 8:56] = True
    return Target(labels=torch.tensor([1, 2]), masks=masks)


def _perfect_outputs(masks: torch.Tensor, labels: torch.Tensor, num_queries: int = 4) -> Outputs:
    """Confident, correct stride-4 predictions: query ``j`` predicts segment ``j``.

    The remaining queries predict no object.
    """
    class_logits = torch.full((1, num_queries, NUM_CLASSES + 1), -10.0)
    class_logits[0, :, NUM_CLASSES] = 10.0
    height, width = masks.shape[-2] // 4, masks.shape[-1] // 4
    mask_logits = torch.full((1, num_queries, height, width), -20.0)
    for j, label in enumerate(labels):
        class_logits[0, j, NUM_CLASSES] = -10.0
        class_logits[0, j, label] = 10.0
        mask_logits[0, j] = 40.0 * masks[j, ::4, ::4].float() - 20.0
    return Outputs(class_logits, mask_logits)


def _unweighted(losses: dict[str, torch.Tensor], name: str) -> float:
    return losses[name].item() / WEIGHTS[name]


def test_perfect_prediction_gives_near_zero_losses() -> None:
    torch.manual_seed(0)
    target = _block_targets()
    # Uniform points: importance sampling would deliberately pick the few points on mask
    # edges, where bilinear interpolation of stride-4 logits cannot be exact.
    losses = _criterion(importance_sample_ratio=0.0)(
        _perfect_outputs(target["masks"], target["labels"]), [target]
    )
    assert _unweighted(losses, "loss_ce") < 1e-3
    assert _unweighted(losses, "loss_mask") < 0.05
    assert _unweighted(losses, "loss_dice") < 0.05

    torch.manual_seed(0)
    random = Outputs(torch.randn(1, 4, NUM_CLASSES + 1), torch.randn(1, 4, 16, 16))
    random_losses = _criterion(importance_sample_ratio=0.0)(random, [target])
    assert _unweighted(random_losses, "loss_mask") > 0.5
    assert _unweighted(random_losses, "loss_dice") > 0.3


def test_losses_are_weighted_and_named_per_layer() -> None:
    torch.manual_seed(0)
    target = _block_targets()
    layers = [(torch.randn(1, 4, NUM_CLASSES + 1), torch.randn(1, 4, 16, 16)) for _ in range(3)]
    outputs = Outputs(*layers[-1], aux_outputs=layers[:-1])
    criterion = _criterion()

    torch.manual_seed(1)
    losses = criterion(outputs, [target])
    assert set(losses) == {f"{name}{suffix}" for name in WEIGHTS for suffix in ("", "_0", "_1")}

    heavier = SetCriterion(
        NUM_CLASSES,
        criterion.matcher,
        class_weight=4.0,
        mask_weight=10.0,
        dice_weight=10.0,
        num_points=criterion.num_points,
    )
    torch.manual_seed(1)
    doubled = heavier(outputs, [target])
    for name, value in losses.items():
        torch.testing.assert_close(doubled[name], 2 * value)
    torch.testing.assert_close(total_loss(losses), sum(losses.values()))


def test_images_without_targets_learn_no_object_only() -> None:
    torch.manual_seed(0)
    class_logits = torch.randn(2, 5, NUM_CLASSES + 1, requires_grad=True)
    mask_logits = torch.randn(2, 5, 16, 16, requires_grad=True)
    empty = Target(labels=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 64, 64))

    losses = _criterion()(Outputs(class_logits, mask_logits), [empty, empty])

    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_dice"].item() == 0.0
    no_object = torch.full((2, 5), NUM_CLASSES)
    # Every query has the no-object weight, so the weighted mean is the plain mean.
    expected = F.cross_entropy(class_logits.transpose(1, 2), no_object)
    torch.testing.assert_close(losses["loss_ce"], WEIGHTS["loss_ce"] * expected)
    # The mask head stays in the graph (DDP requires every parameter to get a gradient).
    total_loss(losses).backward()
    assert mask_logits.grad is not None


def test_gradients_reach_the_logits_of_every_layer() -> None:
    torch.manual_seed(0)
    layers = [
        (
            torch.randn(1, 4, NUM_CLASSES + 1, requires_grad=True),
            torch.randn(1, 4, 16, 16, requires_grad=True),
        )
        for _ in range(2)
    ]
    outputs = Outputs(*layers[-1], aux_outputs=layers[:-1])
    total_loss(_criterion()(outputs, [_block_targets()])).backward()
    for class_logits, mask_logits in layers:
        assert class_logits.grad is not None and class_logits.grad.abs().sum() > 0
        assert mask_logits.grad is not None and mask_logits.grad.abs().sum() > 0


def test_no_object_class_is_down_weighted() -> None:
    torch.manual_seed(0)
    class_logits = torch.randn(1, 4, NUM_CLASSES + 1)
    mask_logits = torch.randn(1, 4, 16, 16)
    target = _block_targets()
    criterion = _criterion()
    # The criterion matches first, so the same seed gives it the same matching.
    torch.manual_seed(1)
    indices = criterion.matcher(class_logits, mask_logits, [target])
    torch.manual_seed(1)
    loss_ce = criterion(Outputs(class_logits, mask_logits), [target])["loss_ce"]

    labels = torch.full((1, 4), NUM_CLASSES)
    labels[0, indices[0][0]] = target["labels"][indices[0][1]]
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    expected = F.cross_entropy(class_logits.transpose(1, 2), labels, weight=weight)
    torch.testing.assert_close(loss_ce, WEIGHTS["loss_ce"] * expected)
    assert not torch.allclose(expected, F.cross_entropy(class_logits.transpose(1, 2), labels))


def test_smaller_target_masks_are_padded_bottom_right_before_matching() -> None:
    # Image 0 is 32x64 inside a 64x64 batch. Its segment, the top half of the image, is the
    # top quarter of the padded batch the stride-4 predictions cover.
    masks = torch.zeros(1, 32, 64, dtype=torch.bool)
    masks[0, :16] = True
    small = Target(labels=torch.tensor([1]), masks=masks)
    empty = Target(labels=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 64, 64))
    padded = torch.zeros(1, 64, 64, dtype=torch.bool)
    padded[0, :16] = True
    misread = torch.zeros(1, 64, 64, dtype=torch.bool)
    misread[0, :32] = True

    def mask_loss(prediction_masks: torch.Tensor) -> float:
        torch.manual_seed(0)
        outputs = _perfect_outputs(prediction_masks, small["labels"])
        outputs = Outputs(
            outputs.class_logits.repeat(2, 1, 1), outputs.mask_logits.repeat(2, 1, 1, 1)
        )
        losses = _criterion(importance_sample_ratio=0.0)(outputs, [small, empty])
        return _unweighted(losses, "loss_mask")

    assert mask_loss(padded) < 0.05 < 0.5 < mask_loss(misread)


def test_masks_not_covering_the_prediction_extent_are_rejected() -> None:
    # Masks at an unpadded 60x60 image size while the predictions cover a 64x64 batch.
    target = Target(labels=torch.tensor([0]), masks=torch.zeros(1, 60, 60, dtype=torch.bool))
    outputs = Outputs(torch.randn(1, 4, NUM_CLASSES + 1), torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="padded input batch"):
        _criterion()(outputs, [target])


def test_out_of_range_labels_and_class_counts_are_rejected() -> None:
    outputs = Outputs(torch.randn(1, 4, NUM_CLASSES + 1), torch.randn(1, 4, 16, 16))
    bad = Target(labels=torch.tensor([NUM_CLASSES]), masks=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="labels must lie in"):
        _criterion()(outputs, [bad])
    wrong_classes = Outputs(torch.randn(1, 4, NUM_CLASSES), torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="class_logits must be"):
        _criterion()(wrong_classes, [_block_targets()])


def test_num_masks_is_averaged_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    outputs = Outputs(torch.randn(1, 4, NUM_CLASSES + 1), torch.randn(1, 4, 16, 16))
    target = _block_targets()
    torch.manual_seed(1)
    alone = _criterion()(outputs, [target])

    # Two ranks; the other one holds 6 segments, so each rank divides by (2 + 6) / 2 = 4
    # instead of its own 2.
    dist = criterion_module.dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.add_(6.0))
    torch.manual_seed(1)
    distributed = _criterion()(outputs, [target])

    for name in ("loss_mask", "loss_dice"):
        torch.testing.assert_close(distributed[name], alone[name] / 2)
    torch.testing.assert_close(distributed["loss_ce"], alone["loss_ce"])


def test_from_config_takes_weights_and_point_counts() -> None:
    cfg = Mask2FormerConfig(num_classes=7, class_weight=3.0, train_num_points=100)
    criterion = SetCriterion.from_config(cfg)
    assert criterion.num_classes == 7
    assert criterion.class_weight == 3.0
    assert criterion.num_points == criterion.matcher.num_points == 100
    assert criterion.matcher.cost_class == 3.0
    assert criterion.class_loss_weight[-1].item() == pytest.approx(cfg.no_object_weight)
    assert "class_loss_weight" not in criterion.state_dict()
