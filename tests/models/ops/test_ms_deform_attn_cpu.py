"""The CPU gather path of deformable attention against the grid_sample reference, values and gradients.

``test_ms_deform_attn.py`` checks the op's contract through the dispatcher against explicit
loops; here the two implementations meet directly, on random points and on the points where
bilinear sampling has its edge cases (map borders, pixel centres, far outside).
"""

from __future__ import annotations

import pytest
import torch

from segscope.models.ops.ms_deform_attn import (
    MultiScaleDeformableAttention,
    _implementation_for,
    deformable_attention_gather,
    deformable_attention_grid_sample,
    level_extents,
    multi_scale_deformable_attention,
)

SHAPES = [(5, 7), (3, 4), (1, 2)]
NUM_VALUES = sum(h * w for h, w in SHAPES)


def _random_inputs(
    dtype: torch.dtype, batch: int = 2, queries: int = 9, heads: int = 3, dim: int = 4, points: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    value = torch.randn(batch, NUM_VALUES, heads, dim, generator=generator, dtype=dtype)
    # A margin of 0.3 around [0, 1]: a good share of the points reads the zero padding.
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=generator, dtype=dtype)
    return value, locations, weights


def _special_locations(dtype: torch.dtype) -> torch.Tensor:
    """``[1, Q, 1, L, 1, 2]``: every pair of special coordinates, in each level's own pixels.

    Per axis of ``n`` pixels: the outer edges (0, 1), pixel centres ``(i + 0.5) / n``, pixel
    boundaries ``i / n``, half a pixel outside (the last point that still reads the border
    pixel), points that read nothing (just past that, far outside, huge).
    """
    per_level = []
    for height, width in SHAPES:
        axes = []
        for n in (width, height):
            inside = [(i + 0.5) / n for i in range(n)] + [i / n for i in range(n + 1)]
            outside = [-0.5 / n, 1 + 0.5 / n, -0.5 / n - 1e-3, 1 + 0.5 / n + 1e-3, -3.0, 4.0, -1e6, 1e6]
            axes.append(torch.tensor(inside + outside, dtype=dtype))
        grid_x, grid_y = torch.meshgrid(axes[0], axes[1], indexing="ij")
        per_level.append(torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1))
    count = min(len(level) for level in per_level)
    # Pair the levels' lists point by point; each list is cycled so none is cut short.
    points = torch.stack([level[torch.arange(count * 3) % len(level)] for level in per_level], dim=1)
    return points[None, :, None, :, None, :]  # [1, Q, 1, L, 1, 2]


def _outputs_and_gradients(op, value, locations, weights, grad_output=None):
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    output = op(inputs[0], SHAPES, inputs[1], inputs[2])
    if grad_output is None:
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(2), dtype=output.dtype)
    return output, torch.autograd.grad(output, inputs, grad_output)


def _assert_matches_reference(value, locations, weights, atol: float, grad_rtol: float = 0.0) -> None:
    out, grads = _outputs_and_gradients(deformable_attention_gather, value, locations, weights)
    ref_out, ref_grads = _outputs_and_gradients(deformable_attention_grid_sample, value, locations, weights)
    assert (out - ref_out).abs().max() <= atol
    for name, grad, ref_grad in zip(("value", "locations", "weights"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=atol, rtol=grad_rtol, msg=lambda m: f"grad {name}: {m}")


def test_random_points_match_grid_sample_in_float64() -> None:
    _assert_matches_reference(*_random_inputs(torch.float64), atol=1e-12)


def test_random_points_match_grid_sample_in_float32() -> None:
    # Location gradients scale with the map size (d/dx is W_l times d/dpixel): relative check.
    _assert_matches_reference(*_random_inputs(torch.float32), atol=1e-5, grad_rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_borders_pixel_centres_and_outside_points_match_grid_sample(dtype: torch.dtype) -> None:
    locations = _special_locations(dtype)
    queries = locations.shape[1]
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(1, NUM_VALUES, 1, 4, generator=generator, dtype=dtype)
    weights = torch.rand(1, queries, 1, len(SHAPES), 1, generator=generator, dtype=dtype)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    _assert_matches_reference(value, locations, weights, atol=atol, grad_rtol=1e-5)


def test_points_that_read_nothing_give_zero_output_and_zero_gradients() -> None:
    value = torch.randn(1, NUM_VALUES, 2, 3, dtype=torch.float64)
    corners = torch.tensor([[-3.0, 0.5], [0.5, 7.0], [-1e6, -1e6], [1e6, 1e6]], dtype=torch.float64)
    locations = corners[None, :, None, None, None, :].expand(1, 4, 2, len(SHAPES), 2, 2)
    weights = torch.rand(1, 4, 2, len(SHAPES), 2, dtype=torch.float64)
    out, (grad_value, grad_locations, grad_weights) = _outputs_and_gradients(
        deformable_attention_gather, value, locations, weights
    )
    assert not out.any() and not grad_value.any() and not grad_locations.any() and not grad_weights.any()


def test_gradcheck_in_float64() -> None:
    value, locations, weights = _random_inputs(torch.float64, batch=2, queries=3, heads=2, dim=2, points=2)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: deformable_attention_gather(v, SHAPES, loc, w), inputs, eps=1e-6, atol=1e-6
    )


def test_gradient_to_one_input_only() -> None:
    value, locations, weights = _random_inputs(torch.float64)
    value.requires_grad_()
    output = deformable_attention_gather(value, SHAPES, locations, weights)
    (grad,) = torch.autograd.grad(output.sum(), value)
    reference = deformable_attention_grid_sample(value, SHAPES, locations, weights)
    (ref_grad,) = torch.autograd.grad(reference.sum(), value)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)


def test_cpu_values_take_the_gather_path_and_other_devices_the_reference() -> None:
    assert _implementation_for(torch.empty(1)) is deformable_attention_gather
    assert _implementation_for(torch.empty(1, device="meta")) is deformable_attention_grid_sample


@pytest.mark.parametrize("mode", ["is_compiling", "is_exporting"])
def test_cpu_graphs_being_compiled_or_exported_take_the_portable_path(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gather path's sizes depend on the data, which neither compiler nor exporter can follow."""
    monkeypatch.setattr(torch.compiler, mode, lambda: True)
    assert _implementation_for(torch.empty(1)) is deformable_attention_grid_sample


def test_graphs_being_traced_take_the_portable_path() -> None:
    """Exporters know ``grid_sample`` (ONNX GridSample), not the gather path's data-dependent sizes."""
    chosen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        chosen.append((torch.jit.is_tracing(), _implementation_for(x)))
        return x * 2

    torch.jit.trace(probe, (torch.ones(2),))
    assert (True, deformable_attention_grid_sample) in chosen
    assert all(implementation is deformable_attention_gather for tracing, implementation in chosen if not tracing)


def test_layer_with_shared_level_extent_matches_the_layer_building_it() -> None:
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(16, num_heads=2, num_levels=len(SHAPES), num_points=2)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.3)
    query, value = torch.randn(2, 5, 16), torch.randn(2, NUM_VALUES, 16)
    reference_points = torch.rand(2, 5, len(SHAPES), 2)
    extent = level_extents(SHAPES, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        built = layer(query, reference_points, value, SHAPES)
        shared = layer(query, reference_points, value, SHAPES, None, extent)
        # The same layer written out: two separate projections, then the portable op.
        offsets = layer.sampling_offsets(query).view(2, 5, 2, len(SHAPES), 2, 2)
        logits = layer.attention_weights(query).view(2, 5, 2, len(SHAPES) * 2)
        locations = reference_points[:, :, None, :, None] + offsets / extent[:, None]
        sampled = deformable_attention_grid_sample(
            layer.value_proj(value).view(2, NUM_VALUES, 2, 8),
            SHAPES,
            locations,
            logits.softmax(-1).view(2, 5, 2, len(SHAPES), 2),
        )
    assert torch.equal(built, shared)
    torch.testing.assert_close(built, layer.output_proj(sampled), atol=1e-5, rtol=1e-5)


def test_dispatcher_matches_reference_on_non_contiguous_value() -> None:
    value, locations, weights = _random_inputs(torch.float64)
    strided = value.transpose(2, 3).contiguous().transpose(2, 3)  # same numbers, heads innermost in memory
    torch.testing.assert_close(
        multi_scale_deformable_attention(strided, SHAPES, None, locations, weights),
        deformable_attention_grid_sample(value, SHAPES, locations, weights),
        atol=1e-12,
        rtol=0,
    )
