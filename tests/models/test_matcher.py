from __future__ import annotations

import pytest
import torch

from segscope.models.mask2former.matcher import (
    HungarianMatcher,
    Target,
    pairwise_dice,
    pairwise_sigmoid_ce,
)

NUM_CLASSES = 5


def _blob_masks(num: int, size: int = 32) -> torch.Tensor:
    """``num`` distinct rectangles, [num, size, size] bool."""
    masks = torch.zeros(num, size, size, dtype=torch.bool)
    for i in range(num):
        masks[i, 4 * i : 4 * i + 8, 2 * i : 2 * i + 12 + i] = True
    return masks


def _predictions_for(
    labels: torch.Tensor, masks: torch.Tensor, queries: torch.Tensor, num_queries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident ``[Q,C+1]`` class and ``[Q,h,w]`` mask logits (stride 4).

    Query ``queries[j]`` predicts target ``j``; the others predict no object, empty masks.
    """
    class_logits = torch.full((num_queries, NUM_CLASSES + 1), -10.0)
    class_logits[:, NUM_CLASSES] = 10.0
    mask_logits = torch.full((num_queries, masks.shape[-2] // 4, masks.shape[-1] // 4), -10.0)
    for j, q in enumerate(queries):
        class_logits[q, NUM_CLASSES] = -10.0
        class_logits[q, labels[j]] = 10.0
        small = torch.nn.functional.avg_pool2d(masks[j][None, None].float(), 4)[0, 0]
        mask_logits[q] = 20.0 * small - 10.0
    return class_logits, mask_logits


def test_matcher_recovers_a_permuted_assignment() -> None:
    torch.manual_seed(0)
    num_queries = 7
    targets, class_logits, mask_logits, permutations = [], [], [], []
    for num_targets in (4, 2):
        labels = torch.randint(0, NUM_CLASSES, (num_targets,))
        masks = _blob_masks(num_targets)
        queries = torch.randperm(num_queries)[:num_targets]
        c, m = _predictions_for(labels, masks, queries, num_queries)
        targets.append(Target(labels=labels, masks=masks))
        class_logits.append(c)
        mask_logits.append(m)
        permutations.append(queries)

    matcher = HungarianMatcher(num_points=256)
    indices = matcher(torch.stack(class_logits), torch.stack(mask_logits), targets)

    for (query_idx, target_idx), queries in zip(indices, permutations):
        assert query_idx.dtype == target_idx.dtype == torch.int64
        assert len(query_idx) == len(queries)
        assert torch.equal(query_idx, query_idx.sort().values)
        assert torch.equal(query_idx, queries[target_idx])


def test_matcher_returns_empty_indices_for_an_image_without_targets() -> None:
    torch.manual_seed(0)
    targets = [
        Target(labels=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, 32, 32)),
        Target(labels=torch.tensor([1, 2]), masks=_blob_masks(2)),
    ]
    indices = HungarianMatcher(num_points=64)(
        torch.randn(2, 4, NUM_CLASSES + 1), torch.randn(2, 4, 8, 8), targets
    )
    assert indices[0][0].numel() == indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 2
    assert sorted(indices[1][1].tolist()) == [0, 1]


def test_matcher_matches_every_query_when_targets_outnumber_queries() -> None:
    torch.manual_seed(0)
    target = Target(labels=torch.tensor([0, 1, 2, 3, 4]), masks=_blob_masks(5))
    query_idx, target_idx = HungarianMatcher(num_points=64)(
        torch.randn(1, 3, NUM_CLASSES + 1), torch.randn(1, 3, 8, 8), [target]
    )[0]
    assert query_idx.tolist() == [0, 1, 2]
    assert len(set(target_idx.tolist())) == 3


def test_class_cost_decides_when_masks_are_uninformative() -> None:
    class_logits = torch.full((1, 3, NUM_CLASSES + 1), -5.0)
    class_logits[0, 0, 2] = 5.0
    class_logits[0, 1, 4] = 5.0
    class_logits[0, 2, 1] = 5.0
    target = Target(labels=torch.tensor([1, 4]), masks=_blob_masks(2))
    matcher = HungarianMatcher(cost_mask=0.0, cost_dice=0.0, num_points=16)
    query_idx, target_idx = matcher(class_logits, torch.zeros(1, 3, 8, 8), [target])[0]
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 2, 1: 1}


def test_non_finite_predictions_are_matched_last_instead_of_raising() -> None:
    torch.manual_seed(0)
    mask_logits = torch.randn(1, 3, 8, 8)
    mask_logits[0, 1] = float("nan")
    target = Target(labels=torch.tensor([0, 1]), masks=_blob_masks(2))
    query_idx, _ = HungarianMatcher(num_points=64)(
        torch.randn(1, 3, NUM_CLASSES + 1), mask_logits, [target]
    )[0]
    assert query_idx.tolist() == [0, 2]


def test_pairwise_costs_equal_the_elementwise_losses_of_each_pair() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 50), (torch.rand(3, 50) > 0.5).float()
    bce = pairwise_sigmoid_ce(logits, targets)
    dice = pairwise_dice(logits, targets)
    for q in range(4):
        for n in range(3):
            expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[q], targets[n]
            )
            p = logits[q].sigmoid()
            expected_dice = 1 - (2 * (p * targets[n]).sum() + 1) / (p.sum() + targets[n].sum() + 1)
            torch.testing.assert_close(bce[q, n], expected_bce)
            torch.testing.assert_close(dice[q, n], expected_dice)


def test_matcher_rejects_malformed_targets() -> None:
    matcher = HungarianMatcher(num_points=16)
    class_logits, mask_logits = torch.randn(1, 3, NUM_CLASSES + 1), torch.randn(1, 3, 8, 8)
    good = Target(labels=torch.tensor([1]), masks=_blob_masks(1))
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        matcher(class_logits, mask_logits, [good, good])
    two_masks = Target(labels=torch.tensor([1]), masks=_blob_masks(2))
    with pytest.raises(ValueError, match="masks must be"):
        matcher(class_logits, mask_logits, [two_masks])
    float_labels = Target(labels=torch.tensor([1.0]), masks=_blob_masks(1))
    with pytest.raises(ValueError, match="int64"):
        matcher(class_logits, mask_logits, [float_labels])
    with pytest.raises(ValueError, match="disagree"):
        matcher(class_logits, torch.randn(1, 4, 8, 8), [good])


def test_matcher_rejects_all_zero_cost_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        HungarianMatcher(cost_class=0.0, cost_mask=0.0, cost_dice=0.0)
