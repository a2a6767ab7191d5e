from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segscope.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from segscope.transforms import Preprocessor, resized_shape, sliding_windows


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _identity_config(short_side: int, max_size: int = 10_000, size_divisibility: int = 1) -> PreprocessConfig:
    """Resizing only: no normalization, no padding."""
    return PreprocessConfig(short_side, max_size, size_divisibility, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    ("size", "short_side", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67
        ((640, 480), 800, 1333, (1067, 800)),
        ((500, 2000), 800, 1333, (333, 1333)),  # long side capped: scale 1333 / 2000
        ((800, 1333), 800, 1333, (800, 1333)),
        ((200, 301), 100, 1000, (100, 151)),  # 150.5 rounds half up, as int(x + 0.5) does
        ((64, 64), 32, 1000, (32, 32)),
    ],
)
def test_resized_shape_follows_detectron2_resize_shortest_edge(
    size: tuple[int, int], short_side: int, max_size: int, expected: tuple[int, int]
) -> None:
    assert resized_shape(*size, short_side, max_size) == expected


def test_batch_is_padded_bottom_right_to_a_multiple_of_size_divisibility() -> None:
    cfg = PreprocessConfig(short_side=64, max_size=1000, size_divisibility=32)
    batch = Preprocessor(cfg)([_noise(50, 70), _noise(40, 30, seed=1)])
    assert batch.original_sizes == [(50, 70), (40, 30)]
    assert batch.image_sizes == [(64, 90), (85, 64)]
    assert batch.images.shape == (2, 3, 96, 96) and batch.images.dtype == torch.float32
    assert batch.images[0, :, 64:].abs().sum() == 0 and batch.images[0, :, :, 90:].abs().sum() == 0
    assert batch.images[1, :, 85:].abs().sum() == 0 and batch.images[1, :, :, 64:].abs().sum() == 0
    assert batch.images[0, :, :64, :90].abs().amin(dim=0).gt(0).any()


def test_images_are_normalized_per_channel_in_0_255_units() -> None:
    image = np.empty((32, 32, 3), np.uint8)
    image[:16] = 255
    image[16:] = 0
    batch = Preprocessor(PreprocessConfig(short_side=32, max_size=32))([image])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(batch.images[0, :, :16], ((255 - mean) / std).expand(3, 16, 32))
    torch.testing.assert_close(batch.images[0, :, 16:], (-mean / std).expand(3, 16, 32))


@pytest.mark.parametrize(("height", "width", "short_side"), [(97, 131, 50), (120, 90, 45), (60, 80, 150)])
def test_resize_is_within_one_grey_level_of_pil_bilinear(height: int, width: int, short_side: int) -> None:
    image = _noise(height, width)
    batch = Preprocessor(_identity_config(short_side))([image])
    out_h, out_w = batch.image_sizes[0]
    ours = batch.images[0].permute(1, 2, 0).numpy()
    reference = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR), dtype=np.float32)
    difference = np.abs(ours - reference)
    assert difference.max() <= 1.0
    assert difference.mean() < 0.3


def test_image_already_at_target_size_is_passed_through_unchanged() -> None:
    image = _noise(32, 48)
    batch = Preprocessor(_identity_config(32))([image])
    np.testing.assert_array_equal(batch.images[0].permute(1, 2, 0).numpy(), image.astype(np.float32))


def test_batch_is_built_on_the_requested_device() -> None:
    batch = Preprocessor(_identity_config(16))([_noise(16, 16)], device="cpu")
    assert batch.images.device == torch.device("cpu")


def test_bad_images_are_refused_naming_index_shape_and_dtype() -> None:
    preprocess = Preprocessor(PreprocessConfig())
    with pytest.raises(ValueError, match=r"image 1: .*shape \(8, 8, 3\) dtype float32"):
        preprocess([_noise(8, 8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="at least one image"):
        preprocess([])


@pytest.mark.parametrize(
    ("height", "width", "crop", "stride"),
    [(100, 150, 64, 48), (512, 512, 512, 341), (30, 40, 64, 48), (65, 200, 64, 64), (700, 513, 512, 341)],
)
def test_sliding_windows_cover_the_image_and_stay_inside_it(height: int, width: int, crop: int, stride: int) -> None:
    windows = sliding_windows(height, width, crop, stride)
    coverage = np.zeros((height, width), dtype=int)
    for y0, x0, y1, x1 in windows:
        assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
        assert (y1 - y0, x1 - x0) == (min(crop, height), min(crop, width))
        coverage[y0:y1, x0:x1] += 1
    assert coverage.min() >= 1
    assert len(set(windows)) == len(windows)


def test_sliding_windows_match_mmseg_grid() -> None:
    # mmseg: grids = max(size - crop + stride - 1, 0) // stride + 1; last window ends at the border.
    windows = sliding_windows(100, 150, 64, 48)
    assert sorted({(y0, y1) for y0, _, y1, _ in windows}) == [(0, 64), (36, 100)]
    assert sorted({(x0, x1) for _, x0, _, x1 in windows}) == [(0, 64), (48, 112), (86, 150)]
    assert sliding_windows(30, 40, 64, 48) == [(0, 0, 30, 40)]


def test_sliding_windows_refuse_gaps_and_non_positive_sizes() -> None:
    with pytest.raises(ValueError, match="gaps"):
        sliding_windows(100, 100, 32, 48)
    with pytest.raises(ValueError, match="positive"):
        sliding_windows(100, 100, 0, 0)


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (2, 7000)])
def test_extreme_aspect_ratios_keep_at_least_one_pixel_per_side(size: tuple[int, int]) -> None:
    # detectron2's arithmetic gives a short side of 1333 / 4000 = 0.33, rounded to 0, which torch refuses.
    height, width = resized_shape(*size, 800, 1333)
    assert min(height, width) == 1 and max(height, width) == 1333


def test_a_3x5000_image_segments_at_its_own_size(tiny_checkpoint) -> None:
    import segscope

    # The tiny model caps the long side at 128: the short side would be 128 * 3 / 5000 = 0.08.
    image = np.random.default_rng(0).integers(0, 256, (3, 5000, 3), dtype=np.uint8)
    result = segscope.pipeline(model=tiny_checkpoint, device="cpu", task="semantic")(image)
    assert result["semantic_seg"].shape == (3, 5000)
