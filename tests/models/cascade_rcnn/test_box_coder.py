"""DeltaXYWHBBoxCoder: mmdet 2.x's deltas (no +1), dw/dh clamp, clip to the image; torchvision parity."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from segscope.models.cascade_rcnn.box_coder import DeltaXYWHBBoxCoder

STDS = (0.1, 0.1, 0.2, 0.2)


def _random_boxes(num: int, generator: torch.Generator) -> torch.Tensor:
    """``[num,4]`` x0y0x1y1 boxes with sides in [4, 100)."""
    xy = torch.rand(num, 2, generator=generator) * 200
    wh = 4 + torch.rand(num, 2, generator=generator) * 96
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_uses_widths_without_plus_one_and_normalises_by_means_and_stds() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    # centre 5 -> 10 over width 10; width 10 -> 20.
    plain = DeltaXYWHBBoxCoder().encode(anchors, gt)
    torch.testing.assert_close(plain, torch.tensor([[0.5, 0.5, math.log(2), math.log(2)]]))
    coder = DeltaXYWHBBoxCoder(means=(0.1, 0.0, 0.0, -0.1), stds=STDS)
    expected = [(0.5 - 0.1) / 0.1, 0.5 / 0.1, math.log(2) / 0.2, (math.log(2) + 0.1) / 0.2]
    torch.testing.assert_close(coder.encode(anchors, gt), torch.tensor([expected]))


def test_decode_inverts_encode() -> None:
    generator = torch.Generator().manual_seed(0)
    anchors, gt = _random_boxes(64, generator), _random_boxes(64, generator)
    coder = DeltaXYWHBBoxCoder(means=(0.01, -0.02, 0.0, 0.03), stds=STDS)
    torch.testing.assert_close(coder.decode(anchors, coder.encode(anchors, gt)), gt, rtol=1e-5, atol=1e-3)


def test_encode_and_decode_match_torchvision_box_coder_with_weights_one_over_stds() -> None:
    generator = torch.Generator().manual_seed(1)
    anchors, gt = _random_boxes(50, generator), _random_boxes(50, generator)
    ours = DeltaXYWHBBoxCoder(stds=STDS)
    theirs = BoxCoder(weights=tuple(1 / s for s in STDS))
    torch.testing.assert_close(ours.encode(anchors, gt), theirs.encode_single(gt, anchors), rtol=1e-5, atol=1e-5)
    # Three boxes per reference ([N, 4k], e.g. class-specific), deltas inside the clamp range.
    deltas = torch.randn(50, 12, generator=generator) * 0.3
    expected = theirs.decode_single(deltas, anchors)
    torch.testing.assert_close(ours.decode(anchors, deltas), expected, rtol=1e-5, atol=1e-4)


def test_dw_dh_are_clamped_on_both_sides_to_log_1000_over_16() -> None:
    coder = DeltaXYWHBBoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0]])
    decoded = coder.decode(anchors, torch.tensor([[0.0, 0.0, 10.0, -10.0], [0.0, 0.0, -10.0, 10.0]]))
    # A side of 16 * 1000 / 16 = 1000 or 16 * 16 / 1000 = 0.256 around centre 8.
    big, small = 500.0, 0.128
    expected = torch.tensor([[8 - big, 8 - small, 8 + big, 8 + small], [8 - small, 8 - big, 8 + small, 8 + big]])
    torch.testing.assert_close(decoded, expected)
    # torchvision clamps dw/dh only from above: its height is 16 * exp(-10).
    theirs = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).decode_single(torch.tensor([[0.0, 0.0, 10.0, -10.0]]), anchors[:1])
    assert theirs[0, 3] - theirs[0, 1] == pytest.approx(16 * math.exp(-10), rel=1e-2)


def test_decode_clips_to_width_and_height_without_minus_one() -> None:
    coder = DeltaXYWHBBoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 0.0, 0.0]])
    # Unclipped: [10, 0, 20, 10] and [-10, 20, 0, 30]; the image is 25 high and 15 wide.
    decoded = coder.decode(anchors, deltas, max_shape=(25, 15))
    torch.testing.assert_close(decoded, torch.tensor([[10.0, 0.0, 15.0, 10.0], [0.0, 20.0, 0.0, 25.0]]))


def test_decoding_no_boxes_gives_no_boxes() -> None:
    coder = DeltaXYWHBBoxCoder()
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 12), max_shape=(10, 10)).shape == (0, 12)
