from __future__ import annotations

import torch

from segscope.models.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from segscope.models.ops.ms_deform_attn import level_reference_points


def test_reference_points_are_pixel_centres_of_each_level() -> None:
    points = level_reference_points([(2, 4), (1, 2)], batch=3, device=torch.device("cpu"))
    assert points.shape == (3, 2 * 4 + 1 * 2, 1, 2) and points.dtype == torch.float32
    # Row-major: the second position of level 0 is row 0, column 1 of a 2x4 map.
    torch.testing.assert_close(points[0, 1, 0], torch.tensor([1.5 / 4, 0.5 / 2]))
    torch.testing.assert_close(points[0, 9, 0], torch.tensor([1.5 / 2, 0.5 / 1]))


def test_outputs_mask_features_at_stride_4_and_levels_coarsest_first() -> None:
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(
        (8, 16, 24, 40), dim=32, mask_dim=48, num_layers=2, ffn_dim=64, num_heads=4, num_points=2
    ).eval()
    # A 72x100 image: ceil-divided maps at strides 4, 8, 16, 32.
    features = [torch.randn(2, c, h, w) for c, (h, w) in zip((8, 16, 24, 40), [(18, 25), (9, 13), (5, 7), (3, 4)])]
    with torch.no_grad():
        mask_features, multi_scale = decoder(features)
    assert mask_features.shape == (2, 48, 18, 25)
    assert [tuple(x.shape) for x in multi_scale] == [(2, 32, 3, 4), (2, 32, 5, 7), (2, 32, 9, 13)]
    assert torch.isfinite(mask_features).all()
