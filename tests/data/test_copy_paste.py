"""Simple Copy-Paste: pasted objects cover what lies under them, in the image and the targets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from segscope.data.transforms import Sample, copy_paste
from segscope.engine.train_config import TINY_SYNTHETIC
from segscope.errors import ConfigError


def _sample(value: int, boxes: list[tuple[int, int, int, int]], labels: list[int]) -> Sample:
    masks = torch.zeros(len(boxes), 8, 8, dtype=torch.bool)
    for mask, (y0, x0, y1, x1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
    return Sample(torch.full((3, 8, 8), value, dtype=torch.uint8), torch.tensor(labels), masks)


def _always(generator_seed: int) -> torch.Generator:
    """A generator whose first draws are all below 1/2 (every object chosen)."""
    for seed in range(generator_seed, generator_seed + 1000):
        g = torch.Generator().manual_seed(seed)
        if bool((torch.rand(2, generator=g) < 0.5).all()):
            return torch.Generator().manual_seed(seed)
    raise AssertionError("no seed found")


def test_pasted_objects_replace_pixels_and_occlude_targets() -> None:
    target = _sample(10, [(0, 0, 4, 8), (4, 0, 8, 8)], [0, 2])  # top half class 0, bottom half class 2
    source = _sample(200, [(0, 0, 4, 4), (6, 6, 8, 8)], [1, 1])
    pasteable = torch.tensor([True, True, False])
    result = copy_paste(target, source, pasteable, _always(0))
    assert result.labels.tolist() == [0, 2, 1, 1]
    # The top-left quarter and the bottom-right corner are the source's now.
    assert (result.image[:, :4, :4] == 200).all() and (result.image[:, 6:, 6:] == 200).all()
    assert (result.image[:, 4:6, :] == 10).all()
    assert result.masks[0].sum() == 16 and not result.masks[0, :4, :4].any()  # top half minus the pasted quarter
    assert result.masks[1].sum() == 28 and not result.masks[1, 6:, 6:].any()
    assert not (result.masks.sum(0) > 1).any()  # still a partition where it was one


def test_fully_covered_targets_are_dropped_and_stuff_is_never_pasted() -> None:
    target = _sample(10, [(0, 0, 2, 2)], [0])
    source = _sample(200, [(0, 0, 4, 4), (4, 4, 8, 8)], [1, 2])
    result = copy_paste(target, source, torch.tensor([True, True, False]), _always(0))
    assert result.labels.tolist() == [1]  # the covered target is gone; class 2 (stuff) not pasted
    assert (result.image[:, 4:, 4:] == 10).all()
    with pytest.raises(ValueError, match="equal size"):
        copy_paste(target, Sample(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                                  torch.zeros(0, 4, 4, dtype=torch.bool)), torch.tensor([True]))


def test_copy_paste_needs_objects() -> None:
    with pytest.raises(ConfigError, match="copy_paste .* not semantic"):
        replace(TINY_SYNTHETIC, task="semantic", categories="coco_stuff", copy_paste=0.5)
    with pytest.raises(ConfigError, match="copy_paste must be a number in"):
        replace(TINY_SYNTHETIC, copy_paste=1.5)
