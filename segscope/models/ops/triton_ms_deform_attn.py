"""Multi-scale deformable attention as fused Triton kernels (forward and backward).

Why a hand-written kernel: every query reads, per head, level and point, the four pixels
around a data-dependent fractional position and sums them with bilinear and attention
weights. No torch or torchvision op fuses this gather; the portable path in
``ms_deform_attn.py`` runs one ``F.grid_sample`` per level, writes every sample
``[B*M, D, Q, L*P]`` to memory and reduces it afterwards, and its backward does the same.
Here each sample is gathered, weighted and accumulated in registers and never stored.

Contract: the same as ``multi_scale_deformable_attention`` (see its docstring). ``value``
``[B, S, M, D]``, levels flattened row-major and concatenated; ``sampling_locations``
``[B, Q, M, L, P, 2]`` ``(x, y)`` in ``[0, 1]`` with ``align_corners=False`` semantics (the
centre of column ``j`` is ``(j + 0.5) / W``); corners outside the map read zero;
``attention_weights`` ``[B, Q, M, L, P]``; output ``[B, Q, M * D]``.

Launch grid and blocking: one program per (query block, batch * head), grid
``(cdiv(Q, BLOCK_Q), B * M)``. A program holds a ``[BLOCK_Q, BLOCK_D]`` float32 accumulator
and loops over levels and points at run time (no recompilation per ``L`` or ``P``).
``BLOCK_D`` is ``D`` rounded up to a power of two with the tail masked; ``BLOCK_Q`` keeps the
tile at about 2048 elements (64 queries for ``D = 32``). Putting the head in the grid rather
than in the tile means a gathered corner is one contiguous row of ``D`` channels of
``value`` (``value[b, s, m, :]``), so every corner load is ``BLOCK_Q`` contiguous runs.

Memory layout: all tensors are made contiguous in their documented shapes; no transposes
are materialized. Offsets into ``value`` and its gradient are computed in int64 (``B*S*M*D``
may pass 2**31 for large inputs). Spatial shapes and level starts are read from small int64
device tensors, so changing the image size does not recompile.

Dtypes: ``value`` may be float32, bfloat16 or float16; ``sampling_locations`` and
``attention_weights`` may each have their own float dtype (float32 locations with bfloat16
values is the usual mixed-precision case). Everything is loaded and accumulated in float32;
outputs and gradients are cast back to their input's dtype at the store.

Backward: the same grid. Per point, a program re-gathers the four corners, then
``grad_attention_weights = sum_d(grad_out * sample)`` and the two location gradients
(``dsample/dx`` from the corner differences, scaled by ``W_l`` or ``H_l``) are reduced over
the channel axis and written directly: each (query, head, level, point) belongs to exactly
one program. ``grad_value`` receives ``attention * bilinear weight * grad_out`` at the four
corners, which many queries share, so it is scattered with atomic adds into a float32
buffer, cast to ``value``'s dtype at the end (atomic adds make its summation order, and so
its last bits, nondeterministic).

Gradients at points exactly on a pixel centre follow ``floor``: the slope towards the next
pixel, as ``F.grid_sample`` does. Locations are clamped to just outside the map before the
integer conversion so that far-away or huge locations cannot overflow; such points read
zeros and get zero gradients either way.

The kernels are registered as the custom ops ``segscope::deformable_attention`` and its
``_backward`` (shape-only fake implementations, autograd between them), so ``torch.compile``
keeps them in its graphs as opaque calls rather than falling back to ``grid_sample``.

To run the kernels on CPU tensors with Triton's interpreter (slow; for tests), set
``TRITON_INTERPRET=1`` before triton is first imported in the process: ``@triton.jit`` reads
it when it decorates, both here and in ``triton.language``'s own helpers (``tl.zeros``), so
setting it later gives kernels that fail inside the interpreter. Without Triton the module
still imports and ``triton_available`` is False.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton import knobs as _triton_knobs
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None
    _triton_knobs = None

# Whether the kernels below were decorated for Triton's CPU interpreter (decided at import).
_INTERPRETED: bool = bool(_triton_knobs is not None and _triton_knobs.runtime.interpret)

# Tile size in elements: BLOCK_Q * BLOCK_D.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_Q = 64


def triton_available(tensor: Tensor) -> bool:
    """Whether ``triton_deformable_attention`` can run on ``tensor``'s device.

    True when Triton imports and the tensor is on a CUDA (or ROCm) device, or when the
    kernels were built for Triton's interpreter (``TRITON_INTERPRET=1`` when this module was
    imported) and the tensor is on the CPU.
    """
    if triton is None:
        return False
    if tensor.is_cuda:
        return True
    return _INTERPRETED and tensor.device.type == "cpu"


if triton is not None:

    @triton.jit
    def _gather_corner(
        value_base,
        start,
        row_stride,
        yy,
        xx,
        height,
        width,
        query_mask,
        channels,
        channel_mask,
    ):
        """Rows ``value[b, start + yy * W + xx, m, :]`` as float32 ``[BLOCK_Q, BLOCK_D]``; zero outside."""
        inside = query_mask & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        rows = start + yy * width + xx  # int64
        offsets = rows[:, None] * row_stride + channels[None, :]
        mask = inside[:, None] & channel_mask[None, :]
        corner = tl.load(value_base + offsets, mask=mask, other=0.0).to(tl.float32)
        return corner, offsets, mask

    @triton.jit
    def _locate(loc_ptr, index, query_mask, height, width):
        """Top-left corner ``(x0, y0)`` (int64) and fractions ``(fx, fy)`` of points ``[BLOCK_Q]``."""
        x = tl.load(loc_ptr + 2 * index, mask=query_mask, other=0.0).to(tl.float32)
        y = tl.load(loc_ptr + 2 * index + 1, mask=query_mask, other=0.0).to(tl.float32)
        width_f = width.to(tl.float32)
        height_f = height.to(tl.float32)
        # Pixel centres at integer coordinates; beyond [-2, size + 1] every corner is outside
        # anyway, and the clamp keeps the integer conversion in range.
        px = tl.minimum(tl.maximum(x * width_f - 0.5, -2.0), width_f + 1.0)
        py = tl.minimum(tl.maximum(y * height_f - 0.5, -2.0), height_f + 1.0)
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        return x0f.to(tl.int64), y0f.to(tl.int64), px - x0f, py - y0f

    @triton.jit
    def _corners(value_base, start, row_stride, loc_ptr, index, query_mask, height, width, channels, channel_mask):
        """The four bilinear corners of points ``index [BLOCK_Q]`` on one level, each a float32
        ``[BLOCK_Q, BLOCK_D]`` block with its offsets and mask, and the fractions ``(fx, fy)``."""
        x0, y0, fx, fy = _locate(loc_ptr, index, query_mask, height, width)
        v00, o00, k00 = _gather_corner(
            value_base, start, row_stride, y0, x0, height, width, query_mask, channels, channel_mask
        )
        v01, o01, k01 = _gather_corner(
            value_base, start, row_stride, y0, x0 + 1, height, width, query_mask, channels, channel_mask
        )
        v10, o10, k10 = _gather_corner(
            value_base, start, row_stride, y0 + 1, x0, height, width, query_mask, channels, channel_mask
        )
        v11, o11, k11 = _gather_corner(
            value_base, start, row_stride, y0 + 1, x0 + 1, height, width, query_mask, channels, channel_mask
        )
        return v00, v01, v10, v11, o00, o01, o10, o11, k00, k01, k10, k11, fx, fy

    @triton.jit
    def _forward_kernel(
        value_ptr,
        shapes_ptr,
        starts_ptr,
        loc_ptr,
        attn_ptr,
        out_ptr,
        num_queries,
        num_values,
        num_heads,
        head_dim,
        num_levels,
        num_points,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        query_block = tl.program_id(0)
        batch_head = tl.program_id(1)
        b = (batch_head // num_heads).to(tl.int64)
        m = (batch_head % num_heads).to(tl.int64)
        queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        query_mask = queries < num_queries
        channels = tl.arange(0, BLOCK_D)
        channel_mask = channels < head_dim

        row_stride = num_heads * head_dim
        value_base = value_ptr + b * num_values * row_stride + m * head_dim
        # Index of (b, q, m, level 0, point 0) in attention_weights [B, Q, M, L, P].
        point_base = ((b * num_queries + queries) * num_heads + m) * (num_levels * num_points)

        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        for level in range(num_levels):
            height = tl.load(shapes_ptr + 2 * level)
            width = tl.load(shapes_ptr + 2 * level + 1)
            start = tl.load(starts_ptr + level)
            for point in range(num_points):
                index = point_base + level * num_points + point
                attn = tl.load(attn_ptr + index, mask=query_mask, other=0.0).to(tl.float32)
                v00, v01, v10, v11, _, _, _, _, _, _, _, _, fx, fy = _corners(
                    value_base, start, row_stride, loc_ptr, index, query_mask, height, width, channels, channel_mask
                )
                top = v00 + (v01 - v00) * fx[:, None]
                bottom = v10 + (v11 - v10) * fx[:, None]
                sample = top + (bottom - top) * fy[:, None]
                acc += attn[:, None] * sample

        out_offsets = ((b * num_queries + queries) * num_heads + m)[:, None] * head_dim + channels[None, :]
        out_mask = query_mask[:, None] & channel_mask[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _backward_kernel(
        value_ptr,
        shapes_ptr,
        starts_ptr,
        loc_ptr,
        attn_ptr,
        grad_out_ptr,
        grad_value_ptr,
        grad_loc_ptr,
        grad_attn_ptr,
        num_queries,
        num_values,
        num_heads,
        head_dim,
        num_levels,
        num_points,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        query_block = tl.program_id(0)
        batch_head = tl.program_id(1)
        b = (batch_head // num_heads).to(tl.int64)
        m = (batch_head % num_heads).to(tl.int64)
        queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        query_mask = queries < num_queries
        channels = tl.arange(0, BLOCK_D)
        channel_mask = channels < head_dim

        row_stride = num_heads * head_dim
        value_offset = b * num_values * row_stride + m * head_dim
        value_base = value_ptr + value_offset
        grad_value_base = grad_value_ptr + value_offset  # float32, same layout as value
        point_base = ((b * num_queries + queries) * num_heads + m) * (num_levels * num_points)

        out_offsets = ((b * num_queries + queries) * num_heads + m)[:, None] * head_dim + channels[None, :]
        out_mask = query_mask[:, None] & channel_mask[None, :]
        grad_out = tl.load(grad_out_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)

        for level in range(num_levels):
            height = tl.load(shapes_ptr + 2 * level)
            width = tl.load(shapes_ptr + 2 * level + 1)
            start = tl.load(starts_ptr + level)
            for point in range(num_points):
                index = point_base + level * num_points + point
                attn = tl.load(attn_ptr + index, mask=query_mask, other=0.0).to(tl.float32)
                v00, v01, v10, v11, o00, o01, o10, o11, k00, k01, k10, k11, fx, fy = _corners(
                    value_base, start, row_stride, loc_ptr, index, query_mask, height, width, channels, channel_mask
                )
                gx = fx[:, None]
                gy = fy[:, None]
                top = v00 + (v01 - v00) * gx
                bottom = v10 + (v11 - v10) * gx
                sample = top + (bottom - top) * gy

                grad_attn = tl.sum(grad_out * sample, axis=1)
                tl.store(grad_attn_ptr + index, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=query_mask)

                # d sample / d px and d py, then the chain rule through px = x * W - 0.5.
                d_dx = (1.0 - gy) * (v01 - v00) + gy * (v11 - v10)
                d_dy = bottom - top
                scaled = grad_out * attn[:, None]
                grad_x = tl.sum(scaled * d_dx, axis=1) * width.to(tl.float32)
                grad_y = tl.sum(scaled * d_dy, axis=1) * height.to(tl.float32)
                loc_dtype = grad_loc_ptr.dtype.element_ty
                tl.store(grad_loc_ptr + 2 * index, grad_x.to(loc_dtype), mask=query_mask)
                tl.store(grad_loc_ptr + 2 * index + 1, grad_y.to(loc_dtype), mask=query_mask)

                tl.atomic_add(grad_value_base + o00, scaled * ((1.0 - gx) * (1.0 - gy)), mask=k00)
                tl.atomic_add(grad_value_base + o01, scaled * (gx * (1.0 - gy)), mask=k01)
                tl.atomic_add(grad_value_base + o10, scaled * ((1.0 - gx) * gy), mask=k10)
                tl.atomic_add(grad_value_base + o11, scaled * (gx * gy), mask=k11)


def _blocks(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_Q, BLOCK_D)`` for a head width: ``BLOCK_D`` the next power of two."""
    block_d = triton.next_power_of_2(head_dim)
    block_q = max(1, min(_MAX_BLOCK_Q, _TILE_ELEMENTS // block_d))
    return block_q, block_d


def _launch(kernel: Any, inputs: tuple[Tensor, ...], *buffers: Tensor) -> None:
    """Run ``kernel`` on ``inputs`` (value, spatial shapes, level starts, locations, weights) and
    the output ``buffers`` it writes, one program per (query block, batch * head)."""
    value, sampling_locations = inputs[0], inputs[3]
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    block_q, block_d = _blocks(head_dim)
    grid = (triton.cdiv(num_queries, block_q), batch * num_heads)
    kernel[grid](
        *inputs,
        *buffers,
        num_queries,
        num_values,
        num_heads,
        head_dim,
        num_levels,
        num_points,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
    )


# The kernels as PyTorch custom ops: eager autograd and torch.compile see one opaque op with a
# shape-only ("fake") implementation, so a compiled model calls the fused kernels instead of
# tracing into them or falling back to grid_sample. Inputs must already be contiguous.
@torch.library.custom_op("segscope::deformable_attention", mutates_args=())
def _deformable_attention_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    batch, _, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    output = value.new_empty(batch, num_queries, num_heads, head_dim)
    _launch(_forward_kernel, (value, spatial_shapes, level_start_index, sampling_locations, attention_weights), output)
    return output.view(batch, num_queries, num_heads * head_dim)


@_deformable_attention_op.register_fake
def _(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
      attention_weights: Tensor) -> Tensor:
    batch, _, num_heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], num_heads * head_dim)


@torch.library.custom_op("segscope::deformable_attention_backward", mutates_args=())
def _deformable_attention_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_locations = torch.empty_like(sampling_locations)
    grad_weights = torch.empty_like(attention_weights)
    inputs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _launch(_backward_kernel, inputs, grad_output, grad_value, grad_locations, grad_weights)
    # Atomic adds accumulate in float32; the gradient comes back in the values' dtype.
    return grad_value.to(value.dtype), grad_locations, grad_weights


@_deformable_attention_backward_op.register_fake
def _(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
      sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _save_inputs(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor
) -> tuple[Tensor, None, None, Tensor, Tensor]:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _deformable_attention_backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_locations, grad_weights


_deformable_attention_op.register_autograd(_backward, setup_context=_save_inputs)


def triton_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fused multi-scale deformable attention; same contract as ``multi_scale_deformable_attention``.

    Args:
        value: ``[B, S, M, D]`` float32, bfloat16 or float16.
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)`` (pairs are accepted too).
        level_start_index: ``[L]`` int64 offset of each level in ``S``, or None to derive it.
        sampling_locations: ``[B, Q, M, L, P, 2]`` ``(x, y)`` in ``[0, 1]``, any float dtype.
        attention_weights: ``[B, Q, M, L, P]``, any float dtype.

    Returns:
        ``[B, Q, M * D]`` in ``value``'s dtype; differentiable in ``value``,
        ``sampling_locations`` and ``attention_weights``.
    """
    if triton is None:
        raise RuntimeError("triton_deformable_attention needs the triton package, which is not installed")
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError(
            f"expected value [B,S,M,D], sampling_locations [B,Q,M,L,P,2], attention_weights [B,Q,M,L,P]; got "
            f"{tuple(value.shape)}, {tuple(sampling_locations.shape)}, {tuple(attention_weights.shape)}"
        )
    batch, num_values, num_heads, _ = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    expected = (batch, num_queries, num_heads, num_levels, num_points)
    if tuple(sampling_locations.shape) != (*expected, 2) or tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} and attention_weights "
            f"{tuple(attention_weights.shape)} do not agree with value {tuple(value.shape)}"
        )

    # Shapes on the host are checked against value, in Python ints; device tensors are not (reading
    # them would sync), nor tensors in a graph being compiled (reading one would break the graph).
    pairs = _host_pairs(spatial_shapes)
    spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.int64).reshape(-1, 2)
    if spatial_shapes.shape[0] != num_levels:
        raise ValueError(f"spatial_shapes has {spatial_shapes.shape[0]} levels, sampling_locations {num_levels}")
    if pairs is not None and sum(height * width for height, width in pairs) != num_values:
        raise ValueError(f"spatial_shapes {pairs} do not add up to {num_values} value positions")
    if level_start_index is not None and level_start_index.numel() != num_levels:
        raise ValueError(f"level_start_index has {level_start_index.numel()} entries for {num_levels} levels")
    if not triton_available(value):
        raise RuntimeError(
            f"triton_deformable_attention cannot run on {value.device} "
            "(needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported for CPU tensors)"
        )
    spatial_shapes = spatial_shapes.to(value.device).contiguous()
    if level_start_index is None:
        sizes = spatial_shapes.prod(dim=1)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    level_start_index = level_start_index.to(device=value.device, dtype=torch.int64).reshape(-1).contiguous()

    return _deformable_attention_op(
        value.contiguous(),
        spatial_shapes,
        level_start_index,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


def _host_pairs(spatial_shapes: Tensor | Sequence[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """``spatial_shapes`` as ``(H, W)`` ints when they can be read without a sync or graph break."""
    if not isinstance(spatial_shapes, Tensor):
        return [(int(height), int(width)) for height, width in spatial_shapes]
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        return [(height, width) for height, width in spatial_shapes.reshape(-1, 2).tolist()]
    return None
