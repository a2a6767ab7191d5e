"""Typed configurations of the architectures segscope builds.

Configs are plain data: the zoo maps a model name to one of these, checkpoint converters
derive one from a foreign config, and ``models.build_model`` turns one into an ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

# Mean and std of the ImageNet-pretrained backbones, in 0-255 RGB (detectron2's values).
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ResNetConfig:
    """A bottleneck ResNet (torchvision layout: stride in the 3x3 convolution)."""

    kind: Literal["resnet"] = "resnet"
    depth: int = 50


@dataclass(frozen=True)
class SwinConfig:
    """A Swin Transformer as used for dense prediction (detection-style, padded windows)."""

    kind: Literal["swin"] = "swin"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.3
    # Image size the relative position tables were trained at (224 or 384); informative only.
    pretrain_img_size: int = 224


BackboneConfig = Union[ResNetConfig, SwinConfig]


@dataclass(frozen=True)
class PreprocessConfig:
    """Test-time preprocessing: resize the short side, cap the long side, normalize, pad."""

    short_side: int = 800
    max_size: int = 1333
    size_divisibility: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Mask2Former: backbone, deformable-attention pixel decoder, masked-attention decoder."""

    backbone: BackboneConfig = field(default_factory=ResNetConfig)
    num_classes: int = 133
    # Pixel decoder (multi-scale deformable attention encoder + FPN).
    pixel_decoder_dim: int = 256
    mask_dim: int = 256
    pixel_decoder_layers: int = 6
    pixel_decoder_ffn_dim: int = 1024
    pixel_decoder_heads: int = 8
    deform_num_points: int = 4
    # Transformer decoder (masked attention).
    hidden_dim: int = 256
    num_queries: int = 100
    decoder_layers: int = 9
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False
    # Training: loss weights and point sampling of the criterion.
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # Post-processing (detectron2 Mask2Former's test settings).
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    test_topk_per_image: int = 100


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-ready data (nested dataclasses become dicts, tuples lists)."""
    return dataclasses.asdict(config)


def backbone_config_from_dict(data: dict[str, Any]) -> BackboneConfig:
    """Inverse of ``config_to_dict`` for a backbone config, dispatching on ``kind``."""
    kinds: dict[str, type] = {"resnet": ResNetConfig, "swin": SwinConfig}
    kind = data.get("kind")
    if kind not in kinds:
        raise ValueError(f"unknown backbone kind {kind!r}; expected one of {sorted(kinds)}")
    return _from_dict(kinds[kind], data)


def mask2former_config_from_dict(data: dict[str, Any]) -> Mask2FormerConfig:
    """Inverse of ``config_to_dict`` for a Mask2Former config."""
    data = dict(data)
    backbone = backbone_config_from_dict(data.pop("backbone"))
    return _from_dict(Mask2FormerConfig, data, backbone=backbone)


def _from_dict(cls: type, data: dict[str, Any], **overrides: Any) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    values.update(overrides)
    return cls(**values)
