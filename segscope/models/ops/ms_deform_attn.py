"""Multi-scale deformable attention (Deformable DETR, Zhu et al., 2021).

Every query reads a few bilinearly interpolated points per head and per feature level and
returns their attention-weighted sum. ``multi_scale_deformable_attention`` is the one place
the sampling op lives (its portable path runs anywhere ``F.grid_sample`` does: CPU, GPU, any
float dtype); ``MultiScaleDeformableAttention`` is the layer that predicts where to sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    del level_start_index  # offsets follow from spatial_shapes on this path
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = [tuple(shape) for shape in spatial_shapes.tolist()]
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    level_sizes = [height * width for height, width in spatial_shapes]
    if len(level_sizes) != num_levels or sum(level_sizes) != num_values:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} do not match value with {num_values} positions "
            f"and sampling_locations with {num_levels} levels"
        )

    # grid_sample works per (batch, head): fold heads into the batch and move channels first.
    # It also wants the grid in the values' dtype (under autocast it runs both in float32).
    grids = (2.0 * sampling_locations - 1.0).to(value.dtype).transpose(1, 2).flatten(0, 1)  # [B*M, Q, L, P, 2]
    sampled = []
    for level, (level_value, (height, width)) in enumerate(
        zip(value.split(level_sizes, dim=1), spatial_shapes)
    ):
        level_map = level_value.permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
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
    output = (samples * weights).sum(-1)  # [B*M, D, Q]
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


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
    ) -> Tensor:
        """Attend from ``query [B,Q,C]`` to ``value [B,S,C]`` (all levels flattened).

        ``spatial_shapes``: ``(H_l, W_l)`` of each level of ``value``.

        ``reference_points [B,Q,L,2]`` are ``(x, y)`` in ``[0, 1]`` per level; offsets are
        predicted in pixels of each level and normalized by its ``(W_l, H_l)``. Returns
        ``[B,Q,C]``.
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        values = self.value_proj(value).unflatten(-1, (heads, -1))
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # Locations keep the reference points' precision (float32 in half-precision models).
        level_extent = torch.tensor(
            [(width, height) for height, width in spatial_shapes], dtype=reference_points.dtype, device=query.device
        )
        locations = reference_points[:, :, None, :, None, :] + offsets / level_extent[None, None, None, :, None, :]
        output = multi_scale_deformable_attention(values, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)


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
