"""BEiT / BEiTv2 (Bao et al., 2022; Peng et al., 2022): the transformer inside ViT-Adapter.

A plain ViT without absolute position embedding: each block adds its own learned relative
position bias to the attention logits, queries and values have biases and keys do not, and
LayerScale (``gamma_1``, ``gamma_2``) scales both residual branches. Module names follow the
released checkpoints (``blocks.i.attn.relative_position_bias_table``, ``gamma_1``, ...), so
converting them is a matter of prefixes.

Two attention layouts, chosen per block:
- global: every patch attends to every patch (and to the class token, if there is one). The
  bias table is stored for a ``rel_pos_grid`` x ``rel_pos_grid`` patch grid; on any other grid
  it is resized on the fly, differentiably, by the rule timm's and the original's checkpoint
  filters use (positions spaced in a geometric progression, then linear interpolation).
- windowed: the patch grid is zero-padded to whole ``w x w`` windows and each window attends
  within itself (ViT-Adapter's BEiTv2 detector; the padding tokens take part, as there).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from segscope.config import BeitConfig
from segscope.models.backbones.swin import Mlp, window_partition, window_reverse

Grid = tuple[int, int]

# Rows the class token adds to a bias table: class->patch, patch->class, class->class.
CLS_TABLE_ROWS = 3


def relative_position_index(grid: Grid, cls_token: bool) -> Tensor:
    """``[N,N]`` long, ``N = h*w (+1)``: the bias-table row of each (query, key) pair.

    Patch pairs index ``(dy + h - 1) * (2w - 1) + (dx + w - 1)``; with a class token (first
    token) its row, column and corner take the table's last three rows, in the original's order.
    """
    height, width = grid
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :]
    patches = (delta[0] + height - 1) * (2 * width - 1) + (delta[1] + width - 1)
    if not cls_token:
        return patches
    num_relative = (2 * height - 1) * (2 * width - 1)
    index = torch.empty((height * width + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = patches
    index[0, :] = num_relative
    index[:, 0] = num_relative + 1
    index[0, 0] = num_relative + 2
    return index


def _geometric_positions(src: int, dst: int) -> Tensor:
    """Positions of the ``src`` table rows on the ``dst`` axis (BEiT's checkpoint rule).

    The offsets ``0, ±1, ±(1+q), ±(1+q+q²) ...`` grow geometrically so that the outermost
    source row lands at or just past the destination's edge: close offsets keep their
    spacing, far ones stretch. ``q`` is found by bisection in ``[1.01, 1.5]``, as the original
    does (for a shrinking table that leaves it at 1.01).
    """
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if (1.0 - ratio ** (src // 2)) / (1.0 - ratio) > dst // 2:
            right = ratio
        else:
            left = ratio
    offsets, current = [], 1.0
    for i in range(src // 2):
        offsets.append(current)
        current += ratio ** (i + 1)
    return torch.tensor([-o for o in reversed(offsets)] + [0.0] + offsets)


@functools.lru_cache(maxsize=64)
def _interpolation(src: int, dst: int) -> tuple[Tensor, Tensor, Tensor]:
    """Linear interpolation of ``src`` samples at geometric positions onto ``dst`` unit steps.

    Returns ``(left, right, weight_right)``, each ``[dst]``: output ``i`` is
    ``(1 - w) * x[left] + w * x[right]``. Targets beyond the outermost sample take it as is.
    """
    positions = _geometric_positions(src, dst)
    half = dst // 2
    targets = torch.arange(-half, half + 0.1, 1.0)
    right = torch.bucketize(targets, positions).clamp(max=src - 1)
    left = (right - 1).clamp(min=0)
    span = positions[right] - positions[left]
    weight = torch.where(span > 0, (targets - positions[left]) / span.clamp_min(1e-12), torch.ones_like(span))
    return left, right, weight.clamp(0.0, 1.0)


def resize_position_table(table: Tensor, src_grid: Grid, dst_grid: Grid, extra_rows: int) -> Tensor:
    """A ``[(2a-1)(2b-1) + extra, heads]`` bias table for an ``a x b`` grid, resized for ``h x w``.

    The patch-pair rows are interpolated along each axis (``_interpolation``); the trailing
    ``extra_rows`` (class-token rows) are kept. Differentiable, so a model trained at one size
    can be fine-tuned at another.
    """
    (src_h, src_w), (dst_h, dst_w) = src_grid, dst_grid
    if (src_h, src_w) == (dst_h, dst_w):
        return table
    patch_rows, extra = (table[:-extra_rows], table[-extra_rows:]) if extra_rows else (table, None)
    grid = patch_rows.reshape(2 * src_h - 1, 2 * src_w - 1, -1)
    # Both axes go through the interpolation even if one keeps its length (timm's rule: the
    # geometric positions then differ slightly from unit steps).
    for axis, (src, dst) in enumerate(((2 * src_h - 1, 2 * dst_h - 1), (2 * src_w - 1, 2 * dst_w - 1))):
        left, right, weight = (t.to(table.device) for t in _interpolation(src, dst))
        shape = [1, 1, 1]
        shape[axis] = -1
        weight = weight.to(table.dtype).view(shape)
        grid = grid.index_select(axis, left) * (1 - weight) + grid.index_select(axis, right) * weight
    resized = grid.reshape(-1, table.shape[-1])
    return torch.cat((resized, extra)) if extra is not None else resized


class BeitAttention(nn.Module):
    """Multi-head self-attention with a learned relative position bias.

    ``table_grid``: the grid the bias table is stored for (the window, for a windowed block);
    ``window``: the window side in patches, 0 for global attention.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, table_grid: int, window: int, cls_token: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.table_grid = table_grid
        self.window = window
        self.extra_rows = CLS_TABLE_ROWS if cls_token else 0
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # BEiT's keys have no bias (a key bias cancels in the softmax).
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * table_grid - 1) ** 2 + self.extra_rows, num_heads)
        )
        self.proj = nn.Linear(dim, dim)
        self._resized: tuple[tuple, Tensor] | None = None

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """``x [B, N, C]``: the ``h*w`` patches of ``grid (h, w)`` (after the class token, if any)."""
        if not self.window:
            return self._attend(x, grid)
        batch, _, channels = x.shape
        height, width = grid
        pad_h, pad_w = -height % self.window, -width % self.window
        patches = F.pad(x.view(batch, height, width, channels), (0, 0, 0, pad_w, 0, pad_h))
        windows = self._attend(window_partition(patches, self.window), (self.window, self.window))
        merged = window_reverse(windows, self.window, (height + pad_h, width + pad_w))
        return merged[:, :height, :width].reshape(batch, height * width, channels)

    def position_bias(self, grid: Grid) -> Tensor:
        """``[heads, N, N]`` additive attention bias for the tokens of ``grid``."""
        index = _cached_index(grid, self.extra_rows > 0).to(self.relative_position_bias_table.device)
        size = index.shape[0]
        # Gathered head-major, so the bias is contiguous: scaled_dot_product_attention runs
        # about 2.5x slower on CPU with the strided [N, N, heads] -> [heads, N, N] view.
        per_head = self._table_for(grid).t().contiguous()
        return per_head.index_select(1, index.view(-1)).view(-1, size, size)

    def _table_for(self, grid: Grid) -> Tensor:
        """The bias table resized for ``grid``; kept between calls while no gradient is taken
        and the table is unchanged (its version counter moves on every in-place update)."""
        table = self.relative_position_bias_table
        if grid == (self.table_grid, self.table_grid):
            return table
        if torch.is_grad_enabled():
            return resize_position_table(table, (self.table_grid,) * 2, grid, self.extra_rows)
        key = (grid, table._version, table.device, table.dtype)
        if self._resized is None or self._resized[0] != key:
            self._resized = (key, resize_position_table(table, (self.table_grid,) * 2, grid, self.extra_rows))
        return self._resized[1]

    def _attend(self, x: Tensor, grid: Grid) -> Tensor:
        batch, tokens, channels = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn_bias = self.position_bias(grid).to(x.dtype)[None]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


@functools.lru_cache(maxsize=64)
def _cached_index(grid: Grid, cls_token: bool) -> Tensor:
    return relative_position_index(grid, cls_token)


class BeitBlock(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth."""

    def __init__(self, cfg: BeitConfig, drop_path: float, window: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BeitAttention(
            dim,
            cfg.num_heads,
            cfg.qkv_bias,
            table_grid=window or cfg.rel_pos_grid,
            window=window,
            cls_token=cfg.cls_token,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        scale = cfg.layer_scale_init
        self.gamma_1 = nn.Parameter(torch.full((dim,), scale)) if scale > 0 else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), scale)) if scale > 0 else None

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """``x [B, N, C]`` tokens of ``grid`` (class token first, if any) -> same shape."""
        x = x + self._branch(self.attn(self.norm1(x), grid), self.gamma_1)
        return x + self._branch(self.mlp(self.norm2(x)), self.gamma_2)

    def _branch(self, x: Tensor, gamma: Tensor | None) -> Tensor:
        if gamma is not None:
            x = gamma * x
        return stochastic_depth(x, self.drop_path, "row", self.training)


class Beit(nn.Module):
    """Patch embedding, optional class token and ``depth`` blocks; no final norm (dense use).

    The caller drives the blocks (ViT-Adapter interleaves its own modules between spans of
    them); ``forward`` runs them all, for checks against reference implementations.
    """

    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.cls_token else None
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        windows = cfg.window_sizes or (0,) * cfg.depth
        self.blocks = nn.ModuleList(BeitBlock(cfg, rate, window) for rate, window in zip(rates, windows))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The original's: truncated normal (std 0.02) for linear weights and the class token,
        # zero biases, unit LayerNorms, zero bias tables; the patch convolution keeps PyTorch's.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, images: Tensor) -> tuple[Tensor, Grid]:
        """``images [B,3,H,W]`` (H, W multiples of the patch) -> patches ``[B, h*w, C]``, ``(h, w)``."""
        patch = self.config.patch_size
        if images.shape[-2] % patch or images.shape[-1] % patch:
            raise ValueError(f"BEiT needs image sides divisible by {patch}, got {tuple(images.shape[-2:])}")
        x = self.patch_embed.proj(images)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])

    def with_cls(self, patches: Tensor) -> Tensor:
        """Prepend the class token (if the model has one) to ``patches [B, N, C]``."""
        if self.cls_token is None:
            return patches
        return torch.cat((self.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """``[B,3,H,W]`` -> ``[B, (1 +) h*w, C]``: the last block's tokens, class token first."""
        patches, grid = self.embed(images)
        x = self.with_cls(patches)
        for block in self.blocks:
            x = block(x, grid)
        return x
