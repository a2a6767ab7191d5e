"""Fixed 2-D sine position encoding (DETR), as used by Mask2Former's two decoders."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_encoding(
    height: int,
    width: int,
    num_channels: int,
    *,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Normalized sine/cosine encoding of every pixel of an unpadded ``height x width`` map.

    Returns ``[num_channels, height, width]``: the first half of the channels encodes the row,
    the second half the column; within each half, even channels hold sines and odd channels
    cosines of the position at geometrically spaced frequencies. Positions are the 1-based
    pixel index divided by the map's size and multiplied by ``scale``, so the encoding covers
    the same range at every resolution.

    Computed in float32 whatever ``dtype`` asks (half precision cannot resolve the phases),
    then cast.
    """
    if num_channels % 4 != 0:
        raise ValueError(f"num_channels must be divisible by 4, got {num_channels}")
    per_axis = num_channels // 2
    eps = 1e-6  # the reference implementations' guard against a zero denominator
    rows = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    cols = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    # Channels 2i and 2i+1 share the frequency temperature ** (2i / per_axis).
    exponents = torch.arange(per_axis, device=device).div(2, rounding_mode="floor") * 2 / per_axis
    wavelengths = temperature ** exponents.to(torch.float32)

    def encode(positions: Tensor) -> Tensor:  # [N] -> [N, per_axis]
        phases = positions[:, None] / wavelengths
        return torch.stack((phases[:, 0::2].sin(), phases[:, 1::2].cos()), dim=2).flatten(1)

    row_code = encode(rows)[:, None, :].expand(height, width, per_axis)
    col_code = encode(cols)[None, :, :].expand(height, width, per_axis)
    return torch.cat((row_code, col_code), dim=2).permute(2, 0, 1).to(dtype)
