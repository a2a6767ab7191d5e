from __future__ import annotations

import math

import pytest
import torch

from segscope.models.ops.ms_deform_attn import MultiScaleDeformableAttention, multi_scale_deformable_attention

SHAPES = [(5, 7), (3, 4), (1, 2)]


def _inputs(dtype: torch.dtype, batch: int = 2, queries: int = 6, heads: int = 2, dim: int = 3, points: int = 3):
    generator = torch.Generator().manual_seed(0)
    num_values = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, num_values, heads, dim, generator=generator, dtype=dtype)
    # Spill past [0, 1] so border handling (zero padding) is exercised too.
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator, dtype=dtype)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=generator, dtype=dtype)
    weights = weights / weights.sum(dim=(-2, -1), keepdim=True)
    return value, locations, weights


def _bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``image [H,W,D]`` read at normalized ``(x, y)``: 0 and 1 are the map's outer edges."""
    height, width, _ = image.shape
    px, py = x * width - 0.5, y * height - 0.5  # pixel centres sit at integer coordinates
    x0, y0 = math.floor(px), math.floor(py)
    total = torch.zeros(image.shape[-1], dtype=image.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                total += wy * wx * image[yy, xx]
    return total


def _reference(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    batch, queries, heads, levels, points, _ = locations.shape
    dim = value.shape[-1]
    starts = [0]
    for h, w in SHAPES:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for level, (h, w) in enumerate(SHAPES):
                    image = value[b, starts[level] : starts[level + 1], m].reshape(h, w, dim)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        out[b, q, m] += weights[b, q, m, level, p] * _bilinear_zero_padded(image, x, y)
    return out.flatten(2)


def test_matches_explicit_bilinear_sampling_loops() -> None:
    value, locations, weights = _inputs(torch.float64)
    result = multi_scale_deformable_attention(value, SHAPES, None, locations, weights)
    assert result.shape == (2, 6, 2 * 3)
    torch.testing.assert_close(result, _reference(value, locations, weights), rtol=1e-10, atol=1e-10)


def test_matches_hf_transformers_implementation() -> None:
    modeling = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    value, locations, weights = _inputs(torch.float32)
    ours = multi_scale_deformable_attention(value, SHAPES, None, locations, weights)
    theirs = modeling.multi_scale_deformable_attention(value, SHAPES, locations, weights)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_accepts_spatial_shapes_as_tensor_and_level_start_index() -> None:
    value, locations, weights = _inputs(torch.float32)
    shapes = torch.tensor(SHAPES)
    starts = torch.tensor([0, 35, 47])
    from_tensor = multi_scale_deformable_attention(value, shapes, starts, locations, weights)
    from_list = multi_scale_deformable_attention(value, SHAPES, None, locations, weights)
    torch.testing.assert_close(from_tensor, from_list, rtol=0, atol=0)


def test_runs_in_bfloat16_close_to_float32() -> None:
    value, locations, weights = _inputs(torch.float32)
    full = multi_scale_deformable_attention(value, SHAPES, None, locations, weights)
    half = multi_scale_deformable_attention(
        value.bfloat16(), SHAPES, None, locations.bfloat16(), weights.bfloat16()
    )
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0, atol=0.1)


def test_rejects_spatial_shapes_that_do_not_cover_the_values() -> None:
    value, locations, weights = _inputs(torch.float32)
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attention(value, [(5, 7), (3, 4), (2, 2)], None, locations, weights)


def test_layer_starts_sampling_point_k_at_k_pixels_along_its_heads_direction() -> None:
    layer = MultiScaleDeformableAttention(dim=16, num_heads=4, num_levels=2, num_points=3)
    offsets = layer.sampling_offsets.bias.detach().view(4, 2, 3, 2)  # heads, levels, points, xy
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for point in range(3):
        for level in range(2):
            torch.testing.assert_close(offsets[:, level, point], (point + 1) * directions, atol=1e-6, rtol=0)
    assert not layer.sampling_offsets.weight.any()
    # Zero logits: every sampled point starts with the same weight.
    assert not layer.attention_weights.weight.any() and not layer.attention_weights.bias.any()


def test_grid_sample_path_keeps_float32_locations_with_bfloat16_values() -> None:
    """Under autocast the values are bfloat16 but the locations float32: near the far edge of a
    152-wide map a bfloat16 location is off by up to 0.6 pixel, so the grid must not be rounded."""
    from segscope.models.ops.ms_deform_attn import deformable_attention_grid_sample

    width = 152
    value = torch.zeros(1, width, 1, 1, dtype=torch.bfloat16)
    value[0, 140:, 0, 0] = torch.arange(width - 140, dtype=torch.bfloat16)  # a ramp under the points
    pixels = torch.linspace(140.1, 150.8, 23, dtype=torch.float64)  # pixel-centre coordinates
    locations = ((pixels + 0.5) / width).view(1, -1, 1, 1, 1, 1).expand(-1, -1, -1, -1, -1, 2).contiguous()
    locations[..., 1] = 0.5  # the map's one row
    weights = torch.ones(1, len(pixels), 1, 1, 1)
    out = deformable_attention_grid_sample(value, [(1, width)], locations.float(), weights)
    assert out.dtype == torch.bfloat16
    # The ramp read at x is x - 140; the only error left is the output's bfloat16 rounding.
    torch.testing.assert_close(out.double().flatten(), pixels - 140, atol=0.04, rtol=0.004)
