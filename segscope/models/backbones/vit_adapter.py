"""ViT-Adapter (Chen et al., ICLR 2023): a plain ViT made into a four-scale dense backbone.

A small convolutional "spatial prior" branch sees the image at strides 4-32. Around each span
of transformer blocks, an injector lets the ViT's stride-16 tokens read the prior's stride
8/16/32 tokens, and an extractor lets those tokens read the ViT back, both by deformable
attention (``segscope.models.ops``). At the end the stride-8 map is deconvolved to stride 4
and the ViT's tokens, resized, are added to every map. Module names follow the released
checkpoints (``spm``, ``interactions.i.injector``, ``level_embed``, ``up``, ``norm1``..``norm4``)
with the transformer under ``vit``.

Inputs must have sides divisible by 32: the prior's maps must then be exactly 2x, 1x and 0.5x
the ViT's 16-pixel grid, which the original assumes too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from segscope.config import ViTAdapterConfig
from segscope.models.backbones.base import Backbone
from segscope.models.backbones.beit import Beit, BeitBlock, Grid
from segscope.models.ops.ms_deform_attn import MultiScaleDeformableAttention, level_reference_points

# The spatial prior's token levels, by stride relative to the ViT's 16-pixel grid.
_PRIOR_SCALES = (2.0, 1.0, 0.5)  # strides 8, 16, 32


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SpatialPriorModule(nn.Module):
    """ResNet-like stem and three stride-2 convolutions -> maps at strides 4, 8, 16, 32, ``dim`` wide."""

    def __init__(self, inplanes: int, dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, inplanes, 2),
            *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B,3,H,W]`` -> four ``[B,dim,H/s,W/s]`` maps, ``s`` = 4, 8, 16, 32."""
        c1 = self.stem(images)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class MultiLevelDWConv(nn.Module):
    """One depthwise 3x3 convolution applied to each level of a concatenated token sequence."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, shapes: Sequence[Grid]) -> Tensor:
        """``x [B, sum(h*w), C]`` with levels of ``shapes`` concatenated -> same shape."""
        batch, _, channels = x.shape
        levels = x.split([h * w for h, w in shapes], dim=1)
        convolved = [
            self.dwconv(level.transpose(1, 2).reshape(batch, channels, h, w)).flatten(2).transpose(1, 2)
            for level, (h, w) in zip(levels, shapes)
        ]
        return torch.cat(convolved, dim=1)


class ConvFFN(nn.Module):
    """Linear -> depthwise conv (per level) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = MultiLevelDWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, shapes: Sequence[Grid]) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


class Injector(nn.Module):
    """ViT tokens read the spatial prior (3 levels); the update is scaled by a learned ``gamma``."""

    def __init__(self, cfg: ViTAdapterConfig) -> None:
        super().__init__()
        dim = cfg.vit.embed_dim
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _deformable_attention(cfg, num_levels=len(_PRIOR_SCALES))
        self.gamma = nn.Parameter(torch.full((dim,), cfg.vit.layer_scale_init))

    def forward(self, x: Tensor, prior: Tensor, layout: _Layout) -> Tensor:
        """``x [B, h*w, C]`` ViT tokens, ``prior [B, S, C]`` the three prior levels -> new ``x``."""
        attended = self.attn(
            self.query_norm(x), layout.vit_points, self.feat_norm(prior), layout.prior_shapes, layout.prior_starts
        )
        return x + self.gamma * attended


class Extractor(nn.Module):
    """Prior tokens read the ViT (1 level), then a conv-FFN; both residual."""

    def __init__(self, cfg: ViTAdapterConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.vit.embed_dim
        self.drop_path = drop_path
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _deformable_attention(cfg, num_levels=1)
        self.ffn = ConvFFN(dim, int(dim * cfg.cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, prior: Tensor, x: Tensor, layout: _Layout) -> Tensor:
        """``prior [B, S, C]`` queries, ``x [B, h*w, C]`` ViT tokens -> new ``prior``."""
        attended = self.attn(
            self.query_norm(prior), layout.prior_points, self.feat_norm(x), [layout.vit_grid], layout.vit_start
        )
        prior = prior + attended
        update = self.ffn(self.ffn_norm(prior), layout.prior_shapes)
        return prior + stochastic_depth(update, self.drop_path, "row", self.training)


class InteractionBlock(nn.Module):
    """Injector -> a span of ViT blocks -> extractor (and two more extractors in the last block)."""

    def __init__(self, cfg: ViTAdapterConfig, last: bool) -> None:
        super().__init__()
        drop_path = cfg.vit.drop_path_rate  # the original gives every extractor the ViT's top rate
        self.injector = Injector(cfg)
        self.extractor = Extractor(cfg, drop_path)
        self.extra_extractors = nn.ModuleList(Extractor(cfg, drop_path) for _ in range(2)) if last else None

    def forward(
        self, x: Tensor, prior: Tensor, cls: Tensor | None, blocks: Sequence[BeitBlock], layout: _Layout
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        x = self.injector(x, prior, layout)
        if cls is not None:
            x = torch.cat((cls, x), dim=1)
        for block in blocks:
            x = block(x, layout.vit_grid)
        if cls is not None:
            cls, x = x[:, :1], x[:, 1:]
        for extractor in [self.extractor, *(self.extra_extractors or [])]:
            prior = extractor(prior, x, layout)
        return x, prior, cls


class _Layout:
    """Shapes, level offsets and reference points of one input size, shared by every interaction."""

    def __init__(self, height: int, width: int, batch: int, device: torch.device) -> None:
        self.vit_grid: Grid = (height // 16, width // 16)
        self.prior_shapes: list[Grid] = [(height // s, width // s) for s in (8, 16, 32)]
        sizes = [h * w for h, w in self.prior_shapes]
        self.prior_starts = torch.tensor([0, sizes[0], sizes[0] + sizes[1]], device=device)
        self.vit_start = torch.zeros(1, dtype=torch.long, device=device)
        # The injector's queries sample all three prior levels around their own position; the
        # extractor's queries (all prior levels) sample the ViT's single level.
        self.vit_points = level_reference_points([self.vit_grid], batch, device).expand(-1, -1, 3, -1)
        self.prior_points = level_reference_points(self.prior_shapes, batch, device)


def _deformable_attention(cfg: ViTAdapterConfig, num_levels: int) -> MultiScaleDeformableAttention:
    dim = cfg.vit.embed_dim
    return MultiScaleDeformableAttention(
        dim, cfg.deform_num_heads, num_levels, cfg.deform_num_points, value_dim=int(dim * cfg.deform_ratio)
    )


class ViTAdapter(Backbone):
    """BEiT + adapter -> four ``embed_dim``-wide maps at strides 4, 8, 16, 32."""

    def __init__(self, cfg: ViTAdapterConfig) -> None:
        super().__init__()
        if cfg.vit.patch_size != 16:
            raise ValueError(f"ViT-Adapter is built around 16-pixel patches, got patch_size={cfg.vit.patch_size}")
        self.config = cfg
        dim = cfg.vit.embed_dim
        self.out_channels = (dim,) * 4
        self.vit = Beit(cfg.vit)
        self.level_embed = nn.Parameter(torch.zeros(len(_PRIOR_SCALES), dim))
        self.spm = SpatialPriorModule(cfg.conv_inplane, dim)
        count = len(cfg.interaction_indexes)
        self.interactions = nn.ModuleList(InteractionBlock(cfg, last=i == count - 1) for i in range(count))
        self.up = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        # Synchronized across processes under DDP (the trainer converts them), as the original's SyncBN.
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        self.num_layers = cfg.vit.depth
        self._reset_parameters()

    def layer_index(self, name: str) -> int | None:
        """The transformer's layering (BEiT's rule): embedding 0, block ``i`` at ``i + 1``; the
        adapter trains at the full rate."""
        if name in ("vit.cls_token",) or name.startswith("vit.patch_embed."):
            return 0
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        return None

    def _reset_parameters(self) -> None:
        # The original's: truncated normal linears, He-normal (fan-out) convolutions, unit norms,
        # then Deformable DETR's own start for every deformable attention, normal level embeddings.
        for part in (self.up, self.spm, self.interactions):
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                    nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for module in self.interactions.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [B,3,H,W]``, ``H`` and ``W`` multiples of 32 -> maps ``[B,C,H/s,W/s]``, ``s`` = 4..32."""
        batch, _, height, width = images.shape
        if height % 32 or width % 32:
            raise ValueError(f"ViT-Adapter needs image sides divisible by 32, got {height}x{width}")
        layout = _Layout(height, width, batch, images.device)
        c1, *levels = self.spm(images)
        prior = torch.cat(
            [level.flatten(2).transpose(1, 2) + embed for level, embed in zip(levels, self.level_embed)], dim=1
        )
        x, grid = self.vit.embed(images)
        cls = None if self.vit.cls_token is None else self.vit.cls_token.expand(batch, -1, -1)

        vit_maps = []
        for interaction, (first, last) in zip(self.interactions, self.config.interaction_indexes):
            x, prior, cls = interaction(x, prior, cls, self.vit.blocks[first : last + 1], layout)
            vit_maps.append(x)
        if not self.config.vit_feature_per_interaction:
            vit_maps = [x] * 4

        dim = x.shape[-1]
        c2, c3, c4 = (
            level.transpose(1, 2).reshape(batch, dim, h, w)
            for level, (h, w) in zip(prior.split([h * w for h, w in layout.prior_shapes], dim=1), layout.prior_shapes)
        )
        maps = [self.up(c2) + c1, c2, c3, c4]
        for i, (vit_tokens, scale) in enumerate(zip(vit_maps, (4.0, 2.0, 1.0, 0.5))):
            vit_map = vit_tokens.transpose(1, 2).reshape(batch, dim, *grid)
            if scale != 1.0:
                vit_map = F.interpolate(vit_map, scale_factor=scale, mode="bilinear", align_corners=False)
            maps[i] = maps[i] + vit_map
        return [norm(m) for norm, m in zip((self.norm1, self.norm2, self.norm3, self.norm4), maps)]
