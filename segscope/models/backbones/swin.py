"""Swin Transformer (Liu et al., 2021) as a dense-prediction backbone.

Semantics follow the detection Swin (Swin-Transformer-Object-Detection, and Mask2Former's
``D2SwinTransformer``): inputs of any size are padded to the patch size, each block pads its
map to a multiple of the window, the shifted-window mask is built for that padded size, odd
maps are padded before patch merging, and every stage output gets its own LayerNorm.
timm's Swin is not used because it fixes the input resolution (and with it the masks) when
the model is built; detection needs both to follow each input.

Parameter names are the original implementation's (``patch_embed``, ``layers.i.blocks.j``,
``attn.qkv`` packed as q, k, v, ``norm0``..``norm3``), so its checkpoints load once the prefix
and the derived ``relative_position_index`` buffers are dropped.

Versus HF transformers' Swin: its ``SwinLayer`` shrinks the window to the map and drops the
shift when a stage's map is no larger than the window (unless called with
``always_partition=True``, as recent ``SwinBackbone`` versions do); this module always
partitions, as the original does. HF also applies drop path only to the attention branch;
here, as in the original, both residual branches get it. In eval mode the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from segscope.config import SwinConfig
from segscope.models.backbones.base import OUT_STRIDES, Backbone

# The original masks cross-region pairs with -100 (not -inf), which leaves them a weight of
# about e^-100; kept for numerical parity with checkpoints trained that way.
_MASKED = -100.0


class Swin(Backbone):
    """Swin Transformer returning four normalized maps of C, 2C, 4C, 8C channels."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        _validate(cfg)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        # Computed on the CPU whatever the default device (models may be built on "meta" to count them).
        drop_path = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        dims = [cfg.embed_dim * 2**i for i in range(len(cfg.depths))]
        self.layers = nn.ModuleList()
        first_block = 0
        for i, (dim, depth, heads) in enumerate(zip(dims, cfg.depths, cfg.num_heads, strict=True)):
            last = i == len(dims) - 1
            self.layers.append(
                SwinStage(
                    dim,
                    depth,
                    heads,
                    cfg.window_size,
                    cfg.mlp_ratio,
                    cfg.qkv_bias,
                    drop_path[first_block : first_block + depth],
                    downsample=not last,
                )
            )
            first_block += depth
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self.out_channels = tuple(dims)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B,3,H,W]`` -> ``[B,C*2^i,ceil(H/s),ceil(W/s)]`` for s = 4, 8, 16, 32."""
        x, size = self.patch_embed(images)
        features = []
        for i, stage in enumerate(self.layers):
            out, x, next_size = stage(x, size)
            out = getattr(self, f"norm{i}")(out)
            features.append(out.unflatten(1, size).permute(0, 3, 1, 2).contiguous())
            size = next_size
        return features


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution + LayerNorm; pads inputs bottom/right."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[B,3,H,W]`` -> tokens ``[B,h*w,C]`` and ``(h, w)``, ``h = ceil(H/patch)``."""
        height, width = images.shape[-2:]
        pad_w, pad_h = -width % self.patch_size, -height % self.patch_size
        x = self.proj(F.pad(images, (0, pad_w, 0, pad_h)))
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat (4C), LayerNorm, linear to 2C; pads odd maps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """``[B,h*w,C]`` -> ``[B,ceil(h/2)*ceil(w/2),2C]`` and the new size."""
        height, width = size
        x = x.unflatten(1, size)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Order of the original: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        merged_size = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.flatten(1, 2))), merged_size


class SwinStage(nn.Module):
    """Blocks alternating regular and shifted windows, then (optionally) patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: list[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio, qkv_bias, rate)
            for i, rate in enumerate(drop_path)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """``x [B,h*w,C]`` -> (stage output ``[B,h*w,C]``, input of the next stage, its size)."""
        mask = None
        if len(self.blocks) > 1 and self.shift_size:
            mask = shifted_window_mask(size, self.window_size, self.shift_size, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, size, mask if block.shift_size else None)
        if self.downsample is None:
            return x, x, size
        return x, *self.downsample(x, size)


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, each a residual branch with drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, size: tuple[int, int], mask: Tensor | None) -> Tensor:
        """``x [B,h*w,C]``; ``mask [windows,N,N]`` for shifted blocks, None otherwise."""
        height, width = size
        window = self.window_size
        shortcut = x
        x = self.norm1(x).unflatten(1, size)
        # Pad after the norm so padded tokens are exact zeros, as in the original.
        x = F.pad(x, (0, 0, 0, -width % window, 0, -height % window))
        padded = (x.shape[1], x.shape[2])
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, window).unflatten(0, (x.shape[0], -1))
        x = window_reverse(self.attn(windows, mask).flatten(0, 1), window, padded)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width].flatten(1, 2)
        x = shortcut + self._drop_path(x)
        return x + self._drop_path(self.mlp(self.norm2(x)))

    def _drop_path(self, x: Tensor) -> Tensor:
        return stochastic_depth(x, self.drop_path, "row", self.training)


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.normal_(self.relative_position_bias_table, std=0.02)
        # Derived from the window size alone, so not part of the checkpoint.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def forward(self, windows: Tensor, mask: Tensor | None) -> Tensor:
        """``windows [B,nW,N,C]`` (N = window^2), ``mask [nW,N,N]`` or None -> ``[B,nW,N,C]``."""
        batch, num_windows, tokens, channels = windows.shape
        qkv = self.qkv(windows).view(batch, num_windows, tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each [B,nW,heads,N,d], views
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        # Masks are 4-D: CPU SDPA sends a 3-D one to its unfused math path. Each is cast to q's
        # dtype (autocast) before it broadcasts, while it is small.
        if mask is None:
            # [B*nW,heads,N,d] is a view; the [1,heads,N,N] bias broadcasts over every window.
            q, k, v = (t.flatten(0, 1) for t in (q, k, v))
            bias = bias.unsqueeze(0).to(q.dtype)
        else:
            # The mask differs per window, the bias per head, neither per image. Folding the
            # windows into the head axis, [B,nW*heads,N,d] (a copy of q, k, v), lets their sum
            # [1,nW*heads,N,N] broadcast over the batch instead of being repeated B times, while
            # SDPA stays 4-D as its fused kernels require (5-D [B,nW,heads,N,d] runs unfused).
            q, k, v = (t.flatten(1, 2) for t in (q, k, v))
            bias = (bias + mask.unsqueeze(1)).flatten(0, 1).unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.reshape(batch, num_windows, self.num_heads, tokens, -1).transpose(2, 3)
        if torch.compiler.is_exporting():
            # CPU SDPA can return this transpose contiguous, so export records a view; the ONNX
            # decomposition's math attention does not, and the view fails. A copy is exact.
            out = out.clone(memory_format=torch.contiguous_format)
        return self.proj(out.reshape(batch, num_windows, tokens, channels))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window_size: int) -> Tensor:
    """``[N,N]`` long: for each pair of tokens in a window, the row of their bias table entry."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # [2,N,N], each in [0, 2w-2]
    return delta[0] * (2 * window_size - 1) + delta[1]


def shifted_window_mask(
    size: tuple[int, int], window_size: int, shift_size: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``[nW,N,N]`` additive mask for shifted windows over a map of ``size`` padded to the window.

    After the cyclic shift, a window at the bottom/right edge holds tokens from up to three
    bands per axis that were not neighbours in the image; pairs from different bands are masked.
    """
    rows, cols = (_shift_bands(length, window_size, shift_size, device) for length in size)
    regions = (rows[:, None] * 3 + cols[None, :])[None, :, :, None]
    windows = window_partition(regions, window_size).squeeze(-1)  # [nW,N]
    different = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, _MASKED)


def _shift_bands(length: int, window_size: int, shift_size: int, device: torch.device) -> Tensor:
    """Band of each row (or column) of the map padded to the window: 0 for the bulk, 1 for the
    last window minus the shift, 2 for the last ``shift_size``."""
    padded = -(-length // window_size) * window_size
    index = torch.arange(padded, device=device)
    return (index >= padded - window_size).long() + (index >= padded - shift_size).long()


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """``[B,H,W,C]`` (H, W multiples of the window) -> ``[B*nW,window^2,C]``, row-major windows."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.transpose(2, 3).reshape(-1, window_size * window_size, channels)


def window_reverse(windows: Tensor, window_size: int, size: tuple[int, int]) -> Tensor:
    """Inverse of ``window_partition``: ``[B*nW,window^2,C]`` -> ``[B,H,W,C]``."""
    height, width = size
    channels = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, channels)
    return x.transpose(2, 3).reshape(-1, height, width, channels)


def _init_weights(module: nn.Module) -> None:
    # The original's initialization (the patch convolution keeps PyTorch's default). Its
    # truncated normal cuts at +-2 absolute, 100 std away, so a plain normal is the same
    # distribution, and several times faster to draw on CPU.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _validate(cfg: SwinConfig) -> None:
    if cfg.patch_size != 4 or len(cfg.depths) != 4:
        raise ValueError(
            f"Swin must have patch_size 4 and 4 stages to give strides {OUT_STRIDES}, "
            f"got patch_size={cfg.patch_size}, depths={cfg.depths}"
        )
    if len(cfg.num_heads) != len(cfg.depths):
        raise ValueError(f"Swin needs one num_heads entry per stage: depths={cfg.depths}, num_heads={cfg.num_heads}")
    if any(depth < 1 for depth in cfg.depths):
        raise ValueError(f"every Swin stage needs at least one block, got depths={cfg.depths}")
    for i, heads in enumerate(cfg.num_heads):
        dim = cfg.embed_dim * 2**i
        if heads < 1 or dim % heads:
            raise ValueError(f"Swin stage {i} width {dim} is not divisible by num_heads={heads}")
    if cfg.window_size < 1:
        raise ValueError(f"Swin window_size must be positive, got {cfg.window_size}")
    if cfg.mlp_ratio <= 0:
        raise ValueError(f"Swin mlp_ratio must be positive, got {cfg.mlp_ratio}")
    if not 0 <= cfg.drop_path_rate < 1:
        raise ValueError(f"Swin drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")
