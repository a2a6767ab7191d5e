"""Point sampling of dense maps at normalized coordinates (PointRend, Mask2Former training).

Coordinates are ``(x, y)`` in ``[0, 1] x [0, 1]`` relative to the map's extent, so maps of
different resolutions covering the same image (a stride-4 prediction and a full-resolution
target) are read at the same image positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample ``features [N,C,H,W]`` at ``coords [N,P,2]`` (x, y in [0, 1]).

    Returns ``[N,C,P]`` in the wider of the two dtypes, so that half-precision maps are read
    at full-precision coordinates.

    Uses ``align_corners=False``: 0 and 1 are the outer edges of the map, not the centres of
    its corner pixels, so the same coordinate lands on the same image position at any stride.
    Points near the border blend with zero padding, as in the reference implementations.
    """
    if features.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(
            "point_sample expects features [N,C,H,W] and coords [N,P,2], got "
            f"{tuple(features.shape)} and {tuple(coords.shape)}"
        )
    if features.shape[0] != coords.shape[0]:
        raise ValueError(
            f"batch sizes differ: features {features.shape[0]}, coords {coords.shape[0]}"
        )
    dtype = torch.promote_types(features.dtype, coords.dtype)
    # grid_sample wants a [N,H_out,W_out,2] grid in [-1, 1].
    grid = (2.0 * coords - 1.0).to(dtype).unsqueeze(2)
    sampled = F.grid_sample(features.to(dtype), grid, mode="bilinear", align_corners=False)
    return sampled.squeeze(3)


def uncertainty_point_coords(
    logits: Tensor,
    uncertainty_fn: Callable[[Tensor], Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Tensor:
    """Point coordinates biased towards uncertain regions of ``logits [N,1,H,W]`` -> ``[N,P,2]``.

    Draws ``int(num_points * oversample_ratio)`` uniform points per map, keeps the
    ``int(importance_sample_ratio * num_points)`` with the highest ``uncertainty_fn`` score
    (``uncertainty_fn`` maps sampled logits ``[N,1,S]`` to scores of the same shape) and fills
    the remaining points uniformly at random. The important points come first. Not
    differentiable; call it under ``torch.no_grad()``.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    num_maps = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(num_maps, num_sampled, 2, device=logits.device)
    scores = uncertainty_fn(point_sample(logits, coords))[:, 0]

    num_uncertain = int(importance_sample_ratio * num_points)
    top = scores.topk(num_uncertain, dim=1).indices
    coords = torch.gather(coords, 1, top.unsqueeze(-1).expand(-1, -1, 2))

    num_random = num_points - num_uncertain
    if num_random > 0:
        uniform = torch.rand(num_maps, num_random, 2, device=logits.device)
        coords = torch.cat([coords, uniform], dim=1)
    return coords
