"""Multi-scale deformable attention (Deformable DETR, Zhu et al., 2021).

Every query reads a few bilinearly interpolated points per head and per feature level and
returns their attention-weighted sum. ``multi_scale_deformable_attention`` is the one place
the sampling op lives; it dispatches by device (``_implementation_for``): CPU tensors take
``deformable_attention_gather`` (one weighted gather-sum of bilinear corner rows), CUDA tensors
the fused Triton kernels (``triton_ms_deform_attn``, compiled graphs included), everything else
and every graph being exported the portable ``deformable_attention_grid_sample`` (runs anywhere
``F.grid_sample`` does, any float dtype). ``MultiScaleDeformableAttention`` is the layer that
predicts where to sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]] | Tensor,
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Attention-weighted sum of values sampled at fractional positions on several levels.

    Args:
        value: ``[B, S, M, D]``: the ``S = sum(H_l * W_l)`` flattened (row-major) positions of
            all levels, concatenated level after level, split into ``M`` heads of ``D`` channels.
        spatial_shapes: ``(H_l, W_l)`` of each of the ``L`` levels, as pairs or an ``[L, 2]``
            tensor.
        level_start_index: ``[L]`` offset of each level in ``S``. The portable path derives
            the offsets from ``spatial_shapes`` and only accepts this for the fused kernels'
            signature; pass ``None`` if you do not have it.
        sampling_locations: ``[B, Q, M, L, P, 2]``: ``(x, y)`` per query, head, level and point,
            normalized to ``[0, 1]`` over the level's extent (0 and 1 are the outer edges of
            the map, not the centres of its border pixels). Points outside read zeros. Any
            float dtype; sampled in the values' dtype.
        attention_weights: ``[B, Q, M, L, P]``, the weight of each sampled point (softmax-ed
            over ``L * P`` by the caller).

    Returns:
        ``[B, Q, M * D]``, heads concatenated in order.
    """
    del level_start_index  # offsets follow from spatial_shapes on every path here
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = [tuple(shape) for shape in spatial_shapes.tolist()]
    num_values, num_levels = value.shape[1], sampling_locations.shape[3]
    level_sizes = [height * width for height, width in spatial_shapes]
    if len(level_sizes) != num_levels or sum(level_sizes) != num_values:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} do not match value with {num_values} positions "
            f"and sampling_locations with {num_levels} levels"
        )
    implementation = _implementation_for(value)
    return implementation(value, spatial_shapes, sampling_locations, attention_weights)


SamplingOp = Callable[[Tensor, Sequence[tuple[int, int]], Tensor, Tensor], Tensor]


def _implementation_for(value: Tensor) -> SamplingOp:
    """The one dispatch point: the fastest path for ``value``'s device.

    Exported or traced graphs (ONNX, TorchScript, ``torch.export``) take the portable path, whose
    ``grid_sample`` every exporter knows (ONNX ``GridSample``). CUDA tensors take the fused Triton
    kernels when Triton is installed, in ``torch.compile``d graphs too (a custom op, opaque to the
    compiler); CPU tensors the gather path, except while compiling (its sizes depend on the data).
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        return deformable_attention_grid_sample
    if value.is_cuda:
        from segscope.models.ops.triton_ms_deform_attn import triton_available

        return _triton_sampling if triton_available(value) else deformable_attention_grid_sample
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        return deformable_attention_gather
    return deformable_attention_grid_sample


def _triton_sampling(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The fused kernels (``triton_ms_deform_attn``) under the sampling-op signature."""
    from segscope.models.ops.triton_ms_deform_attn import triton_deformable_attention

    return triton_deformable_attention(value, spatial_shapes, None, sampling_locations, attention_weights)


def deformable_attention_grid_sample(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The portable reference: one ``F.grid_sample`` per level (any device, any float dtype).

    Shapes as in ``multi_scale_deformable_attention`` (``spatial_shapes`` as ``(H, W)`` pairs).
    It materialises ``[B*M, D, Q, L*P]`` samples before weighting them.
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    level_sizes = [height * width for height, width in spatial_shapes]
    # grid_sample works per (batch, head): fold heads into the batch and move channels first.
    # It wants grid and map in one dtype: the wider of the two, as rounding float32 locations
    # to bfloat16 (autocast's values) would move points by up to 1/512 of the map.
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    grids = (2.0 * sampling_locations - 1.0).to(dtype).transpose(1, 2).flatten(0, 1)  # [B*M, Q, L, P, 2]
    sampled = []
    for level, (level_value, (height, width)) in enumerate(
        zip(value.split(level_sizes, dim=1), spatial_shapes)
    ):
        level_map = level_value.permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width).to(dtype)
        sampled.append(
            F.grid_sample(
                level_map,
                grids[:, :, level],
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        )  # [B*M, D, Q, P]
    samples = torch.stack(sampled, dim=3).flatten(3)  # [B*M, D, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (samples * weights).sum(-1).to(value.dtype)  # [B*M, D, Q]
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


# The CPU path. Why hand-written: grid_sample has no way to weight and sum the sampled points,
# so it writes every sample ([B*M, D, Q, L*P], 245 MB at 800x1216) and reads it back, one
# (batch, head) map at a time, and its backward scatter-adds into each map. Here every sampled point
# becomes its 4 bilinear corners as rows of value viewed as a table [B*S*M, D] (row
# (b*S + s)*M + m) with weight bilinear x attention x in-bounds, and one embedding_bag (an
# optimized C++ weighted gather-sum, bag = one (b, q, m)) returns [B*Q*M, D] = [B, Q, M*D].


def deformable_attention_gather(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same contract as ``deformable_attention_grid_sample``, as one weighted gather of corner rows.

    Differentiable in ``value``, ``sampling_locations`` and ``attention_weights``.
    """
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    dtype, device = value.dtype, value.device
    bags = batch * num_queries * num_heads
    num_rows = batch * num_values * num_heads
    # Keys below stay within (B*S + (size+2)^2) * M for size = the largest map side (see _linear_taps).
    max_side = max(max(shape) for shape in spatial_shapes)
    key_bound = (batch * num_values + (max_side + 3) ** 2) * num_heads
    index_dtype = torch.int32 if key_bound < 2**31 else torch.int64
    # Level-major [2, L, bags, P] copy so each level's sizes broadcast over whole rows: a few
    # large elementwise ops (on 2 cores op count and memory passes, not arithmetic, cost here).
    coords = sampling_locations.permute(5, 3, 0, 1, 2, 4).contiguous().view(2, num_levels, bags, num_points)
    extent = torch.tensor([[w for _, w in spatial_shapes], [h for h, _ in spatial_shapes]], device=device)
    lower, low_weight, high_weight = _linear_taps(coords, extent[:, :, None, None], dtype, index_dtype)
    taps = torch.stack((low_weight, high_weight), dim=3)  # [xy, L, bags, 2, P]
    # Corner weights [bags, L, dy, dx, P] = attention x y tap x x tap, written in bag order.
    point_weights = attention_weights.to(dtype).reshape(bags, num_levels, 1, num_points)
    y_weights = point_weights * taps[1].transpose(0, 1)
    weights = (y_weights[:, :, :, None] * taps[0].transpose(0, 1)[:, :, None]).view(bags, -1)

    # Unclamped table row of each point's top-left corner, exact for every in-bounds corner:
    # (b * S + level start + y0 * W + x0) * M + m, the table being value as [B*S*M, D].
    widths = extent[0].to(index_dtype)[:, None, None]
    starts = _level_starts(spatial_shapes, device).to(index_dtype)[:, None, None]
    batch_rows = torch.arange(batch, device=device, dtype=index_dtype) * (num_values * num_heads)
    bag_rows = batch_rows[:, None] + torch.arange(num_heads, device=device, dtype=index_dtype)  # [B, M], tiny
    keys = (lower[1] * widths + lower[0] + starts).mul_(num_heads)
    keys.view(num_levels, batch, num_queries, num_heads, num_points).add_(bag_rows[:, None, :, None])
    keys = keys.view(num_levels, bags, num_points)
    steps = torch.tensor([0, 1], device=device, dtype=index_dtype)
    corner_offsets = (steps[:, None] * widths + steps) * num_heads  # [L, dy, dx]
    index = torch.empty(bags, num_levels, 2, 2, num_points, dtype=index_dtype, device=device)
    torch.add(keys.transpose(0, 1)[:, :, None, None], corner_offsets[None, :, :, :, None], out=index)
    index.clamp_(0, num_rows - 1)  # out-of-bounds corners weigh 0: any valid row will do

    table = value.reshape(num_rows, head_dim)
    plan = _TransposePlan(keys, corner_offsets.reshape(num_levels, 4).tolist())
    output = _CornerGatherSum.apply(table, weights, index.view(bags, -1), plan)
    return output.view(batch, num_queries, num_heads * head_dim)


def _level_starts(spatial_shapes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    starts = [0]
    for height, width in spatial_shapes[:-1]:
        starts.append(starts[-1] + height * width)
    return torch.tensor(starts, device=device)


def _linear_taps(
    coords: Tensor, sizes: Tensor, dtype: torch.dtype, index_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """1-D linear interpolation taps of normalized ``coords`` on maps ``sizes`` pixels long.

    ``sizes`` (integer) broadcasts against ``coords``. Returns the lower pixel (``index_dtype``,
    clamped to ``[-2, max(sizes) + 1]``, which keeps every in-bounds test) and the weights of it and
    of the next pixel in ``dtype``, zero where that pixel is outside ``[0, size)``. The pixel
    coordinate is rounded as grid_sample's CPU kernel rounds it (``grid * size/2 + (size-1)/2``
    in one fused multiply-add, ``grid = 2 * coord - 1`` in the values' dtype), so the two agree
    to the last bit in float32.
    """
    if dtype in (torch.float32, torch.float64):
        grid = torch.add(coords.new_tensor(-1.0), coords, alpha=2).to(dtype)  # = 2 * coords - 1, one pass
        half = sizes.double() / 2
        pixel = torch.addcmul(half - 0.5, grid.double(), half).to(dtype)
    else:  # half precision: place the point in float32 and round only the weights
        pixel = coords.float() * sizes - 0.5
    lower = pixel.floor()
    frac = pixel - lower
    lower = lower.clamp_(-2, int(sizes.max()) + 1).to(index_dtype)
    low_weight = torch.where((lower >= 0) & (lower < sizes), 1.0 - frac, 0.0).to(dtype)
    high_weight = torch.where((lower >= -1) & (lower < sizes - 1), frac, 0.0).to(dtype)
    return lower, low_weight, high_weight


class _TransposePlan:
    """What the backward needs to scatter into the table without a serial scatter-add.

    ``keys``: ``[L, bags, P]`` (int32 or int64) unclamped table row of each point's top-left
    corner; its corners are ``keys[l] + offsets[l][corner]``, ``corner = 2 * dy + dx``.
    """

    def __init__(self, keys: Tensor, offsets: list[list[int]]) -> None:
        self.keys = keys
        self.offsets = offsets


class _CornerGatherSum(torch.autograd.Function):
    """``out[r] = sum_k weights[r, k] * table[index[r, k]]``: ``[R, K]`` x ``[T, D]`` -> ``[R, D]``.

    Backward: the weights' gradient is a gathered dot product per entry; the table's is the
    transposed gather, done as embedding_bag over the points sorted by row, per level and
    corner: a shift of sorted keys stays sorted, so one sort per level serves its four corners,
    and torch's CPU scatter-adds (one read of the index per channel) are avoided.
    """

    @staticmethod
    def forward(ctx, table: Tensor, weights: Tensor, index: Tensor, plan: _TransposePlan) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(table, weights, index)
        ctx.plan = plan
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        table, weights, index = ctx.saved_tensors
        grad = grad.contiguous()
        grad_table = _transposed_gather(grad, weights, ctx.plan, table.shape[0]) if ctx.needs_input_grad[0] else None
        grad_weights = _entry_dots(table, weights, index, grad) if ctx.needs_input_grad[1] else None
        return grad_table, grad_weights, None, None


def _entry_dots(table: Tensor, weights: Tensor, index: Tensor, grad: Tensor) -> Tensor:
    """``[R, K]``: ``table[index[r, k]] . grad[r]``.

    embedding_bag's own gradient to its per-sample weights computes exactly this without
    materialising the gathered rows (2.5x faster here than chunked index_select + bmm).
    """
    with torch.enable_grad():
        weights = weights.detach().requires_grad_()
        output = F.embedding_bag(index, table.detach(), mode="sum", per_sample_weights=weights)
        (grad_weights,) = torch.autograd.grad(output, weights, grad)
    return grad_weights


def _transposed_gather(grad: Tensor, weights: Tensor, plan: _TransposePlan, num_rows: int) -> Tensor:
    """``[T, D]``: ``sum over entries (r, k) with index[r, k] == t of weights[r, k] * grad[r]``."""
    bags = grad.shape[0]
    num_levels = len(plan.keys)
    num_points = plan.keys[0].shape[1]
    corner_weights = weights.view(bags, num_levels, 4, num_points)
    out = torch.zeros(num_rows, grad.shape[1], dtype=grad.dtype, device=grad.device)
    for level, (key, offsets) in enumerate(zip(plan.keys, plan.offsets)):
        sorted_keys, order = key.reshape(-1).sort()
        point_bags = order // num_points
        for corner, offset in enumerate(offsets):
            # Entries of row t are a contiguous run of the shifted keys; clamping keeps them sorted
            # and only moves zero-weight (out-of-bounds) corners. Only the rows between the first
            # and last target are touched (one level's rows when B = 1).
            targets = (sorted_keys + offset).clamp_(0, num_rows - 1)
            first, last = int(targets[0]), int(targets[-1])
            rows = torch.arange(first, last + 1, device=grad.device)
            starts = torch.searchsorted(targets, rows)
            entry_weights = corner_weights[:, level, corner].reshape(-1)[order]
            out[first : last + 1] += F.embedding_bag(
                point_bags, grad, starts, mode="sum", per_sample_weights=entry_weights
            )
    return out


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over a multi-level feature sequence (Deformable DETR, Sec. 4.1).

    Each query predicts, per head, ``num_points`` offsets around its reference point on every
    level and one softmax weight per sampled point; values are a linear projection of the
    flattened feature maps (``value_dim`` wide, default ``dim``).
    """

    def __init__(
        self, dim: int, num_heads: int, num_levels: int, num_points: int, value_dim: int | None = None
    ) -> None:
        super().__init__()
        value_dim = value_dim or dim  # ViT-Adapter samples values narrower than its tokens
        if value_dim % num_heads != 0:
            raise ValueError(f"value width {value_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's start: every head samples along its own direction, point k at
        # distance k (in pixels of each level), all points weighted equally.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * distances[None, None, :, None]  # [M, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.num_levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        level_start_index: Tensor | None = None,
        level_extent: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query [B,Q,C]`` to ``value [B,S,C]`` (all levels flattened).

        ``spatial_shapes``: ``(H_l, W_l)`` of each level of ``value``.

        ``reference_points [B,Q,L,2]`` are ``(x, y)`` in ``[0, 1]`` per level; offsets are
        predicted in pixels of each level and normalized by its ``(W_l, H_l)``, the ``[L, 2]``
        ``level_extent`` (built here unless a caller that runs many layers passes
        ``level_extents(spatial_shapes, ...)``). Returns ``[B,Q,C]``.
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        values = self.value_proj(value).unflatten(-1, (heads, -1))
        # Offsets and attention logits in one matmul; the two Linear modules stay for their
        # state-dict keys (checkpoints and converters name them).
        offsets, logits = F.linear(
            query,
            torch.cat((self.sampling_offsets.weight, self.attention_weights.weight)),
            torch.cat((self.sampling_offsets.bias, self.attention_weights.bias)),
        ).split((self.sampling_offsets.out_features, self.attention_weights.out_features), dim=-1)
        offsets = offsets.view(batch, num_queries, heads, levels, points, 2)
        weights = logits.view(batch, num_queries, heads, levels * points).softmax(-1)
        weights = weights.view(batch, num_queries, heads, levels, points)
        # Locations keep the reference points' precision (float32 in half-precision models).
        if level_extent is None:
            level_extent = level_extents(spatial_shapes, reference_points.dtype, query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / level_extent[:, None, :]
        output = multi_scale_deformable_attention(values, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)


def level_extents(spatial_shapes: Sequence[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[L, 2]``: ``(W_l, H_l)`` of each level, what pixel offsets are divided by."""
    return torch.tensor([(width, height) for height, width in spatial_shapes], dtype=dtype, device=device)


def level_reference_points(spatial_shapes: Sequence[tuple[int, int]], batch: int, device: torch.device) -> Tensor:
    """Pixel centres of every level's map as ``(x, y)`` in ``[0, 1]``, levels concatenated.

    Returns ``[B, S, 1, 2]`` float32 whatever the model's dtype (in bfloat16 the centres of a
    200-pixel-wide map would be off by up to half a pixel); callers expand the level axis to
    the levels they sample. Without padding masks the valid region is the whole map, so a
    query's reference point is the same relative position on every level.
    """
    centres = []
    for height, width in spatial_shapes:
        y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        centres.append(torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1))
    return torch.cat(centres, dim=0)[None, :, None, :].expand(batch, -1, -1, -1)
