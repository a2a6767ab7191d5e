from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from segscope.config import ResNetConfig, SwinConfig
from segscope.models.backbones import OUT_STRIDES, build_backbone
from segscope.models.backbones.swin import shifted_window_mask

# A Swin small enough for CPU tests; same structure as Swin-T.
TINY_SWIN = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.0)


def _assert_feature_maps(backbone: torch.nn.Module, height: int, width: int) -> None:
    with torch.no_grad():
        features = backbone.eval()(torch.randn(2, 3, height, width))
    assert backbone.out_strides == OUT_STRIDES == (4, 8, 16, 32)
    shapes = [tuple(f.shape) for f in features]
    expected = [
        (2, channels, math.ceil(height / stride), math.ceil(width / stride))
        for channels, stride in zip(backbone.out_channels, OUT_STRIDES, strict=True)
    ]
    assert shapes == expected


@pytest.mark.parametrize(
    "depth, channels",
    [(18, (64, 128, 256, 512)), (34, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048)), (101, (256, 512, 1024, 2048))],
)
def test_resnet_returns_res2_to_res5_at_ceil_strides(depth: int, channels: tuple[int, ...]) -> None:
    backbone = build_backbone(ResNetConfig(depth=depth))
    assert backbone.out_channels == channels
    _assert_feature_maps(backbone, 67, 45)


def test_resnet_keeps_torchvision_names_and_drops_the_classifier() -> None:
    names = set(build_backbone(ResNetConfig(depth=18)).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.weight"} <= names
    assert "layer2.0.downsample.0.weight" in names
    assert not any(name.startswith(("fc.", "avgpool")) for name in names)


@pytest.mark.parametrize("height, width", [(67, 45), (33, 17), (224, 224), (5, 300)])
def test_swin_returns_four_maps_at_ceil_strides_for_any_input_size(height: int, width: int) -> None:
    backbone = build_backbone(TINY_SWIN)
    assert backbone.out_channels == (16, 32, 64, 128)
    _assert_feature_maps(backbone, height, width)


def test_swin_window12_handles_maps_smaller_than_the_window() -> None:
    config = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=12)
    _assert_feature_maps(build_backbone(config), 97, 130)


def test_swin_uses_the_original_parameter_names_with_packed_qkv() -> None:
    names = set(build_backbone(TINY_SWIN).state_dict())
    expected = {
        "patch_embed.proj.weight",
        "patch_embed.norm.weight",
        "layers.0.blocks.1.attn.qkv.weight",
        "layers.0.blocks.1.attn.relative_position_bias_table",
        "layers.2.downsample.reduction.weight",
        "layers.3.blocks.0.mlp.fc2.bias",
        "norm0.weight",
        "norm3.bias",
    }
    assert expected <= names
    assert not any("relative_position_index" in name or name.startswith("layers.3.downsample") for name in names)


def test_shifted_window_mask_separates_regions_that_the_roll_brought_together() -> None:
    mask = shifted_window_mask((14, 14), window_size=7, shift_size=3, device=torch.device("cpu"), dtype=torch.float32)
    assert mask.shape == (4, 49, 49)
    # The top-left window never wraps around; the bottom-right one holds four regions of
    # 4x4, 4x3, 3x4 and 3x3 tokens, which may only attend within themselves.
    assert (mask[0] == 0).all()
    assert int((mask[3] == 0).sum()) == 16**2 + 12**2 + 12**2 + 9**2
    assert set(mask.unique().tolist()) == {-100.0, 0.0}


def test_shifted_window_mask_covers_the_padded_map() -> None:
    mask = shifted_window_mask((15, 8), window_size=7, shift_size=3, device=torch.device("cpu"), dtype=torch.float32)
    assert mask.shape == (3 * 2, 49, 49)


def test_swin_drop_path_is_random_in_training_and_off_in_eval() -> None:
    backbone = build_backbone(dataclasses.replace(TINY_SWIN, drop_path_rate=0.5))
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        backbone.train()
        torch.manual_seed(0)
        first = backbone(images)[-1]
        torch.manual_seed(1)
        second = backbone(images)[-1]
        backbone.eval()
        assert torch.equal(backbone(images)[-1], backbone(images)[-1])
    assert not torch.allclose(first, second)


def test_swin_backpropagates_to_every_parameter() -> None:
    # A plain sum of a LayerNorm output is flat in its input while the norm's weight is uniform
    # (as initialised): its gradient is zero up to rounding. Project each map on fixed random
    # directions instead, so every parameter gets a gradient that is non-zero by construction.
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    backbone = build_backbone(TINY_SWIN).train()
    features = backbone(torch.randn(1, 3, 70, 50, generator=generator))
    loss = sum((feature * torch.randn(feature.shape, generator=generator)).sum() for feature in features)
    loss.backward()
    no_grad = [name for name, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reaches {no_grad}"


@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda: ResNetConfig(depth=42), "depth 42"),
        (lambda: SwinConfig(patch_size=2), "patch_size"),
        (lambda: SwinConfig(depths=(2, 2, 2)), "depths"),
        (lambda: SwinConfig(num_heads=(3, 6, 12)), "num_heads"),
        (lambda: SwinConfig(embed_dim=96, num_heads=(5, 6, 12, 24)), "not divisible"),
        (lambda: SwinConfig(depths=(2, 0, 2, 2)), "at least one block"),
        (lambda: SwinConfig(window_size=0), "window_size"),
        (lambda: SwinConfig(drop_path_rate=1.0), "drop_path_rate"),
        (lambda: SwinConfig(embed_dim=10**6), "embed_dim"),
    ],
)
def test_bad_backbone_configs_are_refused_naming_the_setting(make_config, message: str) -> None:
    # Value ranges are checked when the config is made, the architecture's rules when it is built.
    with pytest.raises(ValueError, match=message):
        build_backbone(make_config())


def test_build_backbone_rejects_unknown_config_types() -> None:
    with pytest.raises(ValueError, match="no backbone"):
        build_backbone("resnet50")  # type: ignore[arg-type]
