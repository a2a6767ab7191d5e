"""Anchors: mmdet 2.x's exact (unrounded) base anchors and (y, x, anchor) grid order, torchvision parity."""

from __future__ import annotations

import math

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from segscope.models.cascade_rcnn.anchors import AnchorGenerator

STRIDES = (4, 8, 16, 32, 64)
RATIOS = (0.5, 1.0, 2.0)


def _torchvision_generator(ratios: tuple[float, ...]) -> TVAnchorGenerator:
    """torchvision's generator with the RPN's sizes (8 x stride) on every level."""
    return TVAnchorGenerator(sizes=tuple((8 * s,) for s in STRIDES), aspect_ratios=(ratios,) * len(STRIDES))


def _pyramid_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Feature sizes of an image whose sides are multiples of 64 (torchvision infers strides from them)."""
    return [(height // s, width // s) for s in STRIDES]


def _torchvision_anchors(generator: TVAnchorGenerator, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """torchvision's anchors for a 2-image batch whose padded size is stride 4 x the finest map."""
    height, width = sizes[0][0] * 4, sizes[0][1] * 4
    images = ImageList(torch.zeros(2, 3, height, width), [(height, width)] * 2)
    features = [torch.zeros(2, 1, h, w) for h, w in sizes]
    anchors = generator(images, features)
    torch.testing.assert_close(anchors[0], anchors[1], rtol=0, atol=0)
    return anchors[0]


def test_base_anchors_are_the_unrounded_hand_computed_boxes() -> None:
    generator = AnchorGenerator()
    assert generator.num_base_anchors == 3 and generator.num_levels == 5
    for stride, base in zip(STRIDES, generator.base_anchors):
        # A ratio is h / w: h = 8 * stride * sqrt(r), w = 8 * stride / sqrt(r), centred on (0, 0).
        expected = []
        for ratio in RATIOS:
            w, h = 8 * stride / math.sqrt(ratio), 8 * stride * math.sqrt(ratio)
            expected.append([-w / 2, -h / 2, w / 2, h / 2])
        assert base.dtype == torch.float32
        torch.testing.assert_close(base, torch.tensor(expected), rtol=1e-6, atol=1e-5)
    # Stride 4, ratio 0.5: 45.25 x 22.63, not torchvision's rounded 46 x 22.
    torch.testing.assert_close(generator.base_anchors[0][0, 2], torch.tensor(16 * math.sqrt(2)))
    assert torch.equal(_torchvision_generator(RATIOS).cell_anchors[0][0], torch.tensor([-23.0, -11.0, 23.0, 11.0]))


def test_base_anchors_run_over_ratios_then_scales_and_honour_the_centre_offset() -> None:
    generator = AnchorGenerator(strides=(10,), ratios=(0.25, 4.0), scales=(1.0, 2.0), center_offset=0.5)
    # (ratio 0.25: w 20, h 5), (ratio 0.25, scale 2: w 40, h 10), (ratio 4: w 5, h 20), (ratio 4, scale 2)
    sizes = [(20.0, 5.0), (40.0, 10.0), (5.0, 20.0), (10.0, 40.0)]
    expected = torch.tensor([[5 - w / 2, 5 - h / 2, 5 + w / 2, 5 + h / 2] for w, h in sizes])
    torch.testing.assert_close(generator.base_anchors[0], expected)


def test_grid_order_is_row_major_cells_with_the_anchor_fastest_at_two_feature_sizes() -> None:
    generator = AnchorGenerator(strides=(4, 8))
    for sizes in ([(2, 3), (1, 2)], [(3, 2), (2, 1)]):
        levels = generator.grid_anchors(sizes)
        for (height, width), stride, base, anchors in zip(sizes, (4, 8), generator.base_anchors, levels):
            assert anchors.shape == (height * width * 3, 4)
            for y in range(height):
                for x in range(width):
                    for a in range(3):
                        shift = torch.tensor([x * stride, y * stride, x * stride, y * stride], dtype=torch.float32)
                        assert torch.equal(anchors[(y * width + x) * 3 + a], base[a] + shift)


def test_grid_matches_torchvision_shifts_of_the_same_unrounded_cell_anchors() -> None:
    sizes = _pyramid_sizes(128, 192)
    ours = torch.cat(AnchorGenerator().grid_anchors(sizes))
    theirs = _torchvision_generator(RATIOS)
    rounded = _torchvision_anchors(theirs, sizes)
    assert not torch.allclose(ours, rounded)  # torchvision rounds its cell anchors
    theirs.cell_anchors = [a.clone() for a in AnchorGenerator().base_anchors]
    torch.testing.assert_close(ours, _torchvision_anchors(theirs, sizes), rtol=0, atol=0)


def test_ratio_one_anchors_equal_torchvision_where_rounding_does_not_bite() -> None:
    sizes = _pyramid_sizes(192, 64)
    ours = torch.cat(AnchorGenerator(ratios=(1.0,)).grid_anchors(sizes))
    torch.testing.assert_close(ours, _torchvision_anchors(_torchvision_generator((1.0,)), sizes), rtol=0, atol=0)


def test_grid_anchors_are_cached_per_feature_sizes_with_a_bounded_cache() -> None:
    generator = AnchorGenerator(strides=(4,), cache_size=2)
    first = generator.grid_anchors([(2, 2)])
    assert generator.grid_anchors([(2, 2)]) is first
    assert generator.grid_anchors([(3, 2)])[0].shape == (18, 4)
    generator.grid_anchors([(4, 2)])
    assert generator.grid_anchors([(2, 2)]) is not first  # evicted as the least recently used
