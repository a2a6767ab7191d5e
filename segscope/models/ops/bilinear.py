"""Bilinear resizes (``align_corners=False``) evaluated a band of output rows at a time, pixel-major.

Detectron2 resizes every query's mask logits to the original image size before scoring the
classes: at 800x1216 and 100 queries a ``[Q,H,W]`` float32 map of 390 MB, faulted in afresh and
then read once more. A caller that uses the result a band of rows at a time, pixel-major
``[rows,W,Q]`` (the layout its class product wants), needs only that band. ``F.interpolate``
cannot give it: resizing a crop of the input moves the source coordinates at a non-integer
scale, and its result is query-major. So each axis is interpolated here as aten's generic CPU
kernel (``upsample_generic_Nd_kernel_impl``, used whenever the output's height plus width
exceeds 128) does it, with its rule for indices and weights and its order of operations:
widths first, then heights, each output ``fma(lower, lower_weight, upper * upper_weight)``.
On this build the result equals ``F.interpolate``'s to the bit (measured); on a build whose
kernels round the multiply-add differently it differs in the last bit, which the tests allow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class LinearAxis(NamedTuple):
    """One axis of a bilinear resize: each output index ``i`` reads source ``lower[i]`` and ``upper[i]``.

    All four are ``[out]``: int64 source indices and float32 weights (summing to 1).
    """

    lower: Tensor
    upper: Tensor
    lower_weight: Tensor
    upper_weight: Tensor

    def window(self, start: int, stop: int) -> tuple[int, int]:
        """The source indices ``[first, last+1)`` that outputs ``[start, stop)`` read (indices never decrease)."""
        return int(self.lower[start]), int(self.upper[stop - 1]) + 1

    def outputs(self, start: int, stop: int) -> LinearAxis:
        """This axis for its outputs ``[start, stop)`` only; ``outputs(0, n)`` crops it to ``n``."""
        return LinearAxis(*(table[start:stop] for table in self))


def linear_axis(in_size: int, out_size: int) -> LinearAxis | None:
    """Aten's bilinear indices and weights for resizing one axis from ``in_size`` to ``out_size``.

    ``None`` when the sizes are equal: aten then copies (weights 1 and 0 on the same index).
    Otherwise, in float32 as aten computes them: ``scale = in/out``, the source coordinate
    ``fma(scale, i + 0.5, -0.5)`` clamped at 0 (done in float64, where the product is exact, then
    rounded once, as a fused multiply-add rounds), its floor as the lower index (at most
    ``in-1``), the next index unless at the edge, and the fraction as the upper weight.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    if in_size == out_size:
        return None
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    centres = torch.arange(out_size, dtype=torch.float32) + 0.5
    source = (scale.double() * centres.double() - 0.5).float().clamp_min(0)
    lower = source.floor().long().clamp_max(in_size - 1)
    upper_weight = (source - lower).clamp(0, 1)
    upper = torch.where(lower < in_size - 1, lower + 1, lower)
    return LinearAxis(lower, upper, 1 - upper_weight, upper_weight)


class ResizeStage(NamedTuple):
    """One 2-D bilinear resize: its ``rows`` and ``columns`` axes (``None``: unchanged). An axis
    cut to its first ``n`` outputs (``LinearAxis.outputs``) crops the stage's result."""

    rows: LinearAxis | None
    columns: LinearAxis | None


class BandedResize:
    """``maps [h,w,Q]`` (pixel-major) through resize ``stages`` in turn, a band of final rows at a time.

    ``band(top, bottom)`` is rows ``[top,bottom)`` of the last stage's ``[H,W,Q]`` result: it
    resizes only the source rows those rows read, stage by stage, so no stage's whole result
    is ever held. Each stage's intermediate band lives in a buffer kept between calls: a fresh
    band-sized tensor per call is faulted in from the OS each time, which cost 10x the
    arithmetic here (measured).
    """

    def __init__(self, maps: Tensor, stages: Sequence[ResizeStage]) -> None:
        if maps.dim() != 3:
            raise ValueError(f"maps must be pixel-major [h,w,Q], got shape {tuple(maps.shape)}")
        self.maps = maps
        self.stages = tuple(stages)
        height, width = maps.shape[:2]
        for stage in self.stages:
            height = height if stage.rows is None else len(stage.rows.lower)
            width = width if stage.columns is None else len(stage.columns.lower)
        self.size = (height, width)
        self._buffers: dict[str, Tensor] = {}

    def band(self, top: int, bottom: int, out: Tensor | None = None) -> Tensor:
        """Rows ``[top,bottom)`` of the result, ``[bottom-top,W,Q]``, written into ``out`` when given
        (contiguous, that shape), else into a new tensor; never a view of ``maps``."""
        if not 0 <= top < bottom <= self.size[0]:
            raise ValueError(f"band [{top},{bottom}) is outside the result's {self.size[0]} rows")
        shape = (bottom - top, self.size[1], self.maps.shape[2])
        if out is None:
            out = self.maps.new_empty(shape)
        elif tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {shape} tensor, got {tuple(out.shape)}")
        windows = []  # each stage's output rows, from the last stage back
        start, stop = top, bottom
        for stage in reversed(self.stages):
            windows.append((start, stop))
            if stage.rows is not None:
                start, stop = stage.rows.window(start, stop)
        # The last stage that resizes writes into ``out``; the ones before it into kept buffers.
        resizing = [index for index, stage in enumerate(self.stages) if any(axis is not None for axis in stage)]
        final = resizing[-1] if resizing else -1
        band, offset = self.maps[start:stop], start
        for index, (stage, (start, stop)) in enumerate(zip(self.stages, reversed(windows))):
            last = index == final
            if stage.columns is not None:
                shape = (band.shape[0], len(stage.columns.lower), band.shape[2])
                target = out if last and stage.rows is None else self._buffer(f"columns{index}", shape)
                band = interpolate_columns(band, stage.columns, target)
            if stage.rows is not None:
                target = out if last else self._buffer(f"rows{index}", (stop - start, *band.shape[1:]))
                band = interpolate_rows(band, stage.rows.outputs(start, stop), target, offset)
            offset = start
        return out if final >= 0 else out.copy_(band)

    def _buffer(self, name: str, shape: tuple[int, int, int]) -> Tensor:
        """A contiguous ``shape`` view of buffer ``name``, which grows when too small and is kept."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = self.maps.new_empty(numel)
        return buffer[:numel].view(shape)


def interpolate_columns(maps: Tensor, axis: LinearAxis, out: Tensor) -> Tensor:
    """``maps [r,w,Q]`` interpolated along its columns by ``axis`` into ``out [r,W,Q]``.

    Aten's order: ``fma(lower, lower_weight, upper * upper_weight)``, which ``torch.addcmul``
    evaluates with one rounding of the last multiply-add.
    """
    torch.index_select(maps, 1, axis.upper, out=out).mul_(axis.upper_weight[:, None])
    return torch.addcmul(out, maps.index_select(1, axis.lower), axis.lower_weight[:, None], out=out)


def interpolate_rows(maps: Tensor, axis: LinearAxis, out: Tensor, offset: int = 0) -> Tensor:
    """``maps [r,W,Q]`` interpolated along its rows by ``axis`` (whose indices are ``offset`` past
    ``maps``' first row) into ``out [R,W,Q]``, as ``interpolate_columns`` does.

    A row at a time, each two whole rows of ``maps`` combined: gathering the rows first would
    copy every output twice more (measured 12x slower).
    """
    scaled_upper = maps.new_empty(maps.shape[1:])
    lowers, uppers = (axis.lower - offset).tolist(), (axis.upper - offset).tolist()
    for row, (lower, upper) in enumerate(zip(lowers, uppers)):
        torch.mul(maps[upper], axis.upper_weight[row], out=scaled_upper)
        torch.addcmul(scaled_upper, maps[lower], axis.lower_weight[row], out=out[row])
    return out
