"""What every segscope backbone offers the heads built on it."""

from __future__ import annotations

from torch import Tensor, nn

# Every backbone yields four maps at these strides (ceil division for sizes not divisible).
OUT_STRIDES: tuple[int, int, int, int] = (4, 8, 16, 32)


class Backbone(nn.Module):
    """An image encoder returning four NCHW feature maps at strides 4, 8, 16 and 32.

    Subclasses set ``out_channels`` (one entry per map) and implement ``forward``.
    """

    out_channels: tuple[int, ...]
    out_strides: tuple[int, ...] = OUT_STRIDES
    # Depth for layer-wise learning-rate decay (0: the backbone has no such layering).
    num_layers: int = 0

    def layer_index(self, name: str) -> int | None:
        """Layer of parameter ``name`` (backbone-relative) for layer-wise lr decay: 0 for the
        input embedding, ``1..num_layers`` for the stacked blocks, None for everything else
        (which trains at the full rate)."""
        del name
        return None

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B,3,H,W]`` -> ``[B,C_i,ceil(H/s_i),ceil(W/s_i)]`` for each stride ``s_i``."""
        raise NotImplementedError
