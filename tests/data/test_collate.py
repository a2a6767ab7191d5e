from __future__ import annotations

import pytest
import torch

from segscope.data.collate import collate
from segscope.data.transforms import Sample


def _sample(count: int, size: int = 8) -> Sample:
    image = torch.full((3, size, size), count, dtype=torch.uint8)
    return Sample(image, torch.arange(count), torch.ones(count, size, size, dtype=torch.bool))


def test_images_are_stacked_and_targets_kept_per_image() -> None:
    images, targets = collate([_sample(2), _sample(0), _sample(3)])
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [2, 0, 3]
    assert [t["labels"].tolist() for t in targets] == [[0, 1], [], [0, 1, 2]]
    assert [tuple(t["masks"].shape) for t in targets] == [(2, 8, 8), (0, 8, 8), (3, 8, 8)]


def test_images_of_different_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="must share a size"):
        collate([_sample(1, 8), _sample(1, 9)])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_targets_carry_the_boxes_of_their_masks_after_augmentation() -> None:
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 1:7] = True  # rows 2-4, columns 1-6
    masks[1, 7, 7] = True  # one pixel in the corner
    sample = Sample(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2]), masks)
    _, (target,) = collate([sample])
    # x0, y0, x1, y1 with the far edges exclusive; an empty mask (a target cropped away) is all zero.
    assert target["boxes"].tolist() == [[1.0, 2.0, 7.0, 5.0], [7.0, 7.0, 8.0, 8.0], [0.0, 0.0, 0.0, 0.0]]
