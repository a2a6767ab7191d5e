from __future__ import annotations

import math

import pytest
import torch

from segscope.models.ops.position_encoding import sine_position_encoding


def test_rows_then_columns_with_interleaved_sine_and_cosine() -> None:
    height, width, channels = 5, 7, 16
    code = sine_position_encoding(height, width, channels, dtype=torch.float64)
    assert code.shape == (channels, height, width)
    half = channels // 2
    row = torch.arange(1, height + 1, dtype=torch.float64)[:, None].expand(height, width) / height * 2 * math.pi
    col = torch.arange(1, width + 1, dtype=torch.float64)[None, :].expand(height, width) / width * 2 * math.pi
    # Channel pair (2i, 2i+1) of each half uses the wavelength 10000 ** (2i / half).
    for pair in range(half // 2):
        wavelength = 10000 ** (2 * pair / half)
        torch.testing.assert_close(code[2 * pair], (row / wavelength).sin(), atol=1e-5, rtol=0)
        torch.testing.assert_close(code[2 * pair + 1], (row / wavelength).cos(), atol=1e-5, rtol=0)
        torch.testing.assert_close(code[half + 2 * pair], (col / wavelength).sin(), atol=1e-5, rtol=0)
        torch.testing.assert_close(code[half + 2 * pair + 1], (col / wavelength).cos(), atol=1e-5, rtol=0)


def test_half_precision_request_is_computed_in_float32_then_cast() -> None:
    full = sine_position_encoding(40, 60, 64)
    half = sine_position_encoding(40, 60, 64, dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, full.half(), rtol=0, atol=0)


def test_rejects_channel_count_not_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(4, 4, 18)
