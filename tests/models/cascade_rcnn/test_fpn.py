"""FPN: torchvision parity on copied weights (P2-P6), mmdet's module names, extra levels and init."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from segscope.models.cascade_rcnn.fpn import FPN

IN_CHANNELS = (8, 16, 24, 32)
# Odd sizes, so that the nearest upsampling to the lateral's size is exercised (not a plain x2).
SIZES = ((15, 21), (8, 11), (4, 6), (2, 3))


def _features(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h, w, generator=generator) for c, (h, w) in zip(IN_CHANNELS, SIZES)]


def test_matches_torchvision_feature_pyramid_with_last_level_max_pool() -> None:
    torch.manual_seed(0)
    ours = FPN(IN_CHANNELS, out_channels=12, num_outs=5).eval()
    theirs = FeaturePyramidNetwork(list(IN_CHANNELS), 12, extra_blocks=LastLevelMaxPool()).eval()
    for i in range(len(IN_CHANNELS)):
        for name in ("weight", "bias"):
            getattr(theirs.inner_blocks[i][0], name).data.copy_(getattr(ours.lateral_convs[i].conv, name))
            getattr(theirs.layer_blocks[i][0], name).data.copy_(getattr(ours.fpn_convs[i].conv, name))
    features = _features(1)
    with torch.no_grad():
        outs = ours(features)
        expected = list(theirs(OrderedDict((str(i), x) for i, x in enumerate(features))).values())
    assert [tuple(o.shape[-2:]) for o in outs] == [*SIZES, (1, 2)]
    assert len(outs) == len(expected) == 5
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_extra_levels_are_stride_2_subsamples_of_the_previous_output() -> None:
    fpn = FPN(IN_CHANNELS, out_channels=4, num_outs=6).eval()
    with torch.no_grad():
        outs = fpn(_features(2))
    assert len(outs) == 6
    # max_pool2d with kernel 1 keeps every other pixel, starting at the first: 2x3 -> 1x2 -> 1x1.
    torch.testing.assert_close(outs[4], outs[3][..., ::2, ::2], rtol=0, atol=0)
    torch.testing.assert_close(outs[5], outs[4][..., ::2, ::2], rtol=0, atol=0)
    assert outs[5].shape[-2:] == (1, 1)


def test_parameter_names_follow_mmdet_and_init_is_xavier_uniform_with_zero_bias() -> None:
    fpn = FPN(IN_CHANNELS, out_channels=256, num_outs=5)
    kinds, params = ("lateral_convs", "fpn_convs"), ("weight", "bias")
    expected = {f"{kind}.{i}.conv.{p}" for kind in kinds for i in range(4) for p in params}
    assert set(fpn.state_dict()) == expected
    for module in [*fpn.lateral_convs, *fpn.fpn_convs]:
        conv = module.conv
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert torch.count_nonzero(conv.bias) == 0
        assert conv.weight.abs().max() <= bound
        # Uniform on [-b, b] has standard deviation b / sqrt(3).
        assert abs(conv.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
