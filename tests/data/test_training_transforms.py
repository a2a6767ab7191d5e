from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segscope.data.transforms import (
    Compose,
    JitterParams,
    LargeScaleJitter,
    RandomHorizontalFlip,
    Sample,
    nearest_indices,
    training_transform,
)


def _square_sample(height: int = 60, width: int = 80, box: tuple[int, int, int, int] = (10, 30, 20, 50)) -> Sample:
    """A dark image with a white box (rows top..bottom, cols left..right), one mask on it,
    a semantic map (class 3 on the box, 1 elsewhere) and a panoptic map (id 9 on the box)."""
    top, bottom, left, right = box
    image = torch.full((3, height, width), 20, dtype=torch.uint8)
    image[:, top:bottom, left:right] = 255
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[:, top:bottom, left:right] = True
    sem_seg = torch.where(mask[0], 3, 1)
    pan_seg = torch.where(mask[0], 9, 5)
    return Sample(image, torch.tensor([2]), mask, sem_seg, pan_seg)


def _box_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


@pytest.mark.parametrize(("height", "width"), [(60, 80), (80, 60), (17, 130), (128, 128)])
def test_jitter_output_always_has_the_output_size(height: int, width: int) -> None:
    jitter = LargeScaleJitter((64, 96), min_scale=0.1, max_scale=2.0)
    generator = torch.Generator().manual_seed(0)
    sample = _square_sample(height, width, (2, height - 2, 3, width - 3))
    for _ in range(20):
        out = jitter(sample, generator)
        assert out.image.shape == (3, 64, 96) and out.image.dtype == torch.uint8
        assert out.masks.shape[1:] == (64, 96) and out.masks.dtype == torch.bool
        assert out.sem_seg.shape == out.pan_seg.shape == (64, 96)


def test_jitter_params_follow_detectron2_resize_scale_and_crop() -> None:
    generator = torch.Generator().manual_seed(1)
    for scale in (0.3, 1.0, 1.7):
        jitter = LargeScaleJitter(100, min_scale=scale, max_scale=scale)
        params = jitter.sample_params(60, 80, generator)
        # The image fits inside scale * 100 on both sides, aspect ratio kept.
        factor = min(100 * scale / 60, 100 * scale / 80)
        assert params.scaled_size == (round(60 * factor), round(80 * factor))
        assert 0 <= params.offset[0] <= max(params.scaled_size[0] - 100, 0)
        assert 0 <= params.offset[1] <= max(params.scaled_size[1] - 100, 0)


def test_upscaled_square_lands_where_the_params_say_in_image_and_mask() -> None:
    sample = _square_sample()  # box rows 10..30, cols 20..50 of 60x80
    jitter = LargeScaleJitter((64, 96))
    out = jitter.apply(sample, JitterParams(scaled_size=(120, 160), offset=(5, 7)))
    # x2 then shifted by (-5, -7): rows 15..55, cols 33..93.
    assert _box_of(out.masks[0]) == (15, 55, 33, 93)
    bright = out.image.float().mean(0) > 128
    assert torch.equal(bright, out.masks[0])
    assert torch.equal(out.sem_seg == 3, out.masks[0]) and torch.equal(out.pan_seg == 9, out.masks[0])


def test_downscaled_square_lands_where_the_params_say_and_the_rest_is_padding() -> None:
    sample = _square_sample()
    jitter = LargeScaleJitter((64, 96), pad_value=128, ignore_index=255)
    out = jitter.apply(sample, JitterParams(scaled_size=(30, 40), offset=(0, 0)))
    assert _box_of(out.masks[0]) == (5, 15, 10, 25)
    assert torch.equal(out.image.float().mean(0)[:30, :40] > 128, out.masks[0, :30, :40])
    assert (out.image[:, 30:] == 128).all() and (out.image[:, :, 40:] == 128).all()
    assert not out.masks[:, 30:].any() and not out.masks[:, :, 40:].any()
    assert (out.sem_seg[30:] == 255).all() and (out.sem_seg[:, 40:] == 255).all()
    assert (out.pan_seg[30:] == 0).all() and (out.pan_seg[:, 40:] == 0).all()
    assert (out.sem_seg[:30, :40] != 255).all()


def test_masks_and_maps_are_resized_like_nearest_exact_interpolation() -> None:
    labels = torch.randint(0, 7, (1, 1, 37, 53), dtype=torch.uint8)
    expected = F.interpolate(labels, size=(90, 41), mode="nearest-exact")[0, 0]
    rows, cols = nearest_indices(37, 90), nearest_indices(53, 41)
    assert torch.equal(labels[0, 0][rows][:, cols], expected)


def test_targets_cropped_away_are_dropped_with_their_labels() -> None:
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[0, :5, :5] = True  # top-left: cropped away
    masks[1, 30:, 30:] = True  # bottom-right: kept
    masks[2, 18:22, :] = True  # a band across: kept
    sample = Sample(image, torch.tensor([4, 5, 6]), masks)
    out = LargeScaleJitter(40).apply(sample, JitterParams(scaled_size=(80, 80), offset=(40, 40)))
    assert out.labels.tolist() == [5, 6]
    assert out.masks.shape == (2, 40, 40) and out.masks.flatten(1).any(1).all()


def test_flip_mirrors_image_masks_and_maps_together() -> None:
    sample = _square_sample()
    flipped = RandomHorizontalFlip(p=1.0)(sample)
    assert _box_of(flipped.masks[0]) == (10, 30, 30, 60)  # cols 20..50 of 80 -> 30..60
    assert torch.equal(flipped.image.float().mean(0) > 128, flipped.masks[0])
    assert torch.equal(flipped.sem_seg, sample.sem_seg.flip(-1))
    assert torch.equal(flipped.pan_seg, sample.pan_seg.flip(-1))
    assert RandomHorizontalFlip(p=0.0)(sample) is sample


def test_flip_happens_about_as_often_as_asked() -> None:
    flip = RandomHorizontalFlip(p=0.3)
    sample = _square_sample()
    generator = torch.Generator().manual_seed(0)
    flips = sum(not torch.equal(flip(sample, generator).masks, sample.masks) for _ in range(400))
    assert 90 < flips < 150


def test_a_seeded_generator_replays_the_same_augmentation() -> None:
    transform = training_transform(48, min_scale=0.3, max_scale=2.0)
    sample = _square_sample()
    runs = [transform(sample, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].image, runs[1].image) and torch.equal(runs[0].masks, runs[1].masks)
    others = [transform(sample, torch.Generator().manual_seed(s)) for s in range(8, 12)]
    assert any(not torch.equal(o.image, runs[0].image) for o in others)


def test_without_a_generator_the_global_rng_is_used() -> None:
    transform = training_transform(48)
    sample = _square_sample()
    torch.manual_seed(3)
    first = transform(sample)
    torch.manual_seed(3)
    assert torch.equal(transform(sample).image, first.image)
    assert torch.equal(transform(sample, torch.Generator().manual_seed(3)).image, first.image)


def test_compose_applies_transforms_in_order() -> None:
    sample = _square_sample()
    crop = LargeScaleJitter((60, 80), min_scale=0.5, max_scale=0.5)
    out = Compose([RandomHorizontalFlip(p=1.0), crop])(sample)
    # Flipped first (cols 30..60 of 80), then halved (cols 15..30).
    assert _box_of(out.masks[0]) == (5, 15, 15, 30)


def test_sample_from_arrays_and_shape_checks() -> None:
    image = np.zeros((6, 8, 3), dtype=np.uint8)
    image[..., 1] = 7
    sample = Sample.from_arrays(image, torch.tensor([1]), torch.ones(1, 6, 8), sem_seg=np.zeros((6, 8), np.uint8))
    assert sample.image.shape == (3, 6, 8) and (sample.image[1] == 7).all()
    assert sample.masks.dtype == torch.bool and sample.sem_seg.dtype == torch.int64
    with pytest.raises(ValueError, match=r"masks must be \[N, 6, 8\] bool"):
        Sample(sample.image, torch.tensor([1]), torch.ones(1, 6, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="1 masks but labels of shape"):
        Sample(sample.image, torch.tensor([1, 2]), sample.masks)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="min_scale <= max_scale"):
        LargeScaleJitter(64, min_scale=2.0, max_scale=1.0)
    with pytest.raises(ValueError, match="output_size"):
        LargeScaleJitter((64, 0))
    with pytest.raises(ValueError, match="flip probability"):
        RandomHorizontalFlip(1.5)


def test_a_sample_without_targets_goes_through() -> None:
    image = torch.zeros(3, 30, 50, dtype=torch.uint8)
    sample = Sample(image, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 30, 50, dtype=torch.bool))
    out = training_transform(64)(sample, torch.Generator().manual_seed(0))
    assert out.image.shape == (3, 64, 64) and out.masks.shape == (0, 64, 64) and out.labels.shape == (0,)
