"""Banded bilinear resizes against ``F.interpolate`` (the reference they follow) and against themselves."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from segscope.models.ops.bilinear import BandedResize, ResizeStage, linear_axis

# Bit-identity with F.interpolate was measured on this build's AVX512 kernels, whose multiply-adds
# round as torch.addcmul's do; elsewhere the last bit may differ, which the other tests allow.
MEASURED_BUILD = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _interpolate(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``maps [Q,h,w]`` resized by ``F.interpolate`` -> pixel-major ``[H,W,Q]``."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def _whole(resize: BandedResize) -> torch.Tensor:
    return resize.band(0, resize.size[0])


def _one_stage(maps: torch.Tensor, size: tuple[int, int]) -> BandedResize:
    stage = ResizeStage(linear_axis(maps.shape[1], size[0]), linear_axis(maps.shape[2], size[1]))
    return BandedResize(maps.permute(1, 2, 0).contiguous(), [stage])


def _random_sizes(seed: int, count: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    rng = random.Random(seed)
    def size(largest: int) -> tuple[int, int]:
        return rng.randint(1, largest), rng.randint(1, largest)

    return [(size(60), size(200)) for _ in range(count)]


@pytest.mark.parametrize("in_size, out_size", _random_sizes(0, 40) + [((200, 304), (800, 1216)), ((7, 9), (7, 9))])
def test_a_resize_equals_f_interpolate(in_size, out_size) -> None:
    """Up, down and mixed scales, one axis unchanged or both: F.interpolate's values to float
    rounding, and to the bit where aten uses the kernel it follows (output height + width > 128)."""
    maps = 4 * torch.randn(3, *in_size, generator=torch.Generator().manual_seed(sum(in_size + out_size)))
    resize = _one_stage(maps, out_size)
    assert resize.size == out_size
    expected = _interpolate(maps, out_size)
    torch.testing.assert_close(_whole(resize), expected, rtol=1e-6, atol=1e-6)
    if MEASURED_BUILD and sum(out_size) > 128:
        assert torch.equal(_whole(resize), expected)


@pytest.mark.parametrize("rows", [1, 2, 7, 16])
def test_bands_of_any_height_equal_the_whole_result(rows: int) -> None:
    """Two stages with a crop between (detectron2's order): every band is those rows of the whole, bit for bit."""
    maps = torch.randn(5, 13, 17, generator=torch.Generator().manual_seed(1))
    first = ResizeStage(linear_axis(13, 52).outputs(0, 49), linear_axis(17, 68).outputs(0, 61))
    resize = BandedResize(maps.permute(1, 2, 0).contiguous(), [first, ResizeStage(linear_axis(49, 37), None)])
    assert resize.size == (37, 61)
    whole = _whole(resize)
    height = resize.size[0]
    bands = [resize.band(top, min(top + rows, height)) for top in range(0, height, rows)]
    assert torch.equal(torch.cat(bands), whole)
    padded = _interpolate(maps, (52, 68))[:49, :61].permute(2, 0, 1)
    torch.testing.assert_close(whole, _interpolate(padded, (37, 61)), rtol=1e-6, atol=1e-6)


def test_band_writes_into_out_and_never_returns_the_input() -> None:
    maps = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(2))
    unchanged = BandedResize(maps, [ResizeStage(None, None)])
    band = unchanged.band(1, 3)
    band.zero_()  # the caller owns the band: the maps must not change
    assert torch.equal(unchanged.band(1, 3), maps[1:3])
    resize = BandedResize(maps, [ResizeStage(linear_axis(4, 9), linear_axis(6, 11))])
    out = torch.empty(2, 11, 3)
    assert resize.band(5, 7, out) is out
    assert torch.equal(out, resize.band(5, 7))


def test_bad_arguments_are_named() -> None:
    resize = BandedResize(torch.zeros(4, 6, 3), [ResizeStage(linear_axis(4, 8), None)])
    with pytest.raises(ValueError, match="outside the result's 8 rows"):
        resize.band(6, 9)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        resize.band(0, 2, torch.empty(2, 6, 4))
    with pytest.raises(ValueError, match="pixel-major"):
        BandedResize(torch.zeros(4, 6), [])
    with pytest.raises(ValueError, match="sizes must be positive"):
        linear_axis(0, 3)
