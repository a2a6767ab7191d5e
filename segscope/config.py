"""Typed configurations of the architectures segscope builds.

Configs are plain data: the zoo maps a model name to one of these, checkpoint converters
derive one from a foreign config, and ``models.build_model`` turns one into an ``nn.Module``.
Every config checks its values when it is made (``ConfigError`` naming the field), so a value
read from a file (a checkpoint header, a transformers ``config.json``, a training JSON) is
refused before anything is built from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from segscope.errors import ConfigError

# Mean and std of the ImageNet-pretrained backbones, in 0-255 RGB (detectron2's values).
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ResNetConfig:
    """A bottleneck ResNet (torchvision layout: stride in the 3x3 convolution)."""

    kind: Literal["resnet"] = "resnet"
    depth: int = 50

    def __post_init__(self) -> None:
        _check_kind(self, "resnet")
        check_ints(self, depth=(1, 1000))  # the builder knows which depths exist


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

    def __post_init__(self) -> None:
        _check_kind(self, "swin")
        check_ints(self, embed_dim=(1, 4096), window_size=(1, 64), patch_size=(1, 64), pretrain_img_size=(1, 4096))
        check_floats(self, mlp_ratio=(0.0, 64.0), drop_path_rate=(0.0, 1.0))
        check_bools(self, "qkv_bias")
        # Values only; the stage structure (4 stages, widths divisible by heads) is checked
        # by the builder, which knows the architecture.
        _check_int_tuple(self, "depths", (0, 64))
        _check_int_tuple(self, "num_heads", (1, 256))


BackboneConfig = Union[ResNetConfig, SwinConfig]


@dataclass(frozen=True)
class PreprocessConfig:
    """Test-time preprocessing: resize the short side, cap the long side, normalize, pad."""

    short_side: int = 800
    max_size: int = 1333
    size_divisibility: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_ints(self, short_side=(1, 16384), max_size=(1, 16384), size_divisibility=(0, 1024))
        for name, low in (("mean", -1e4), ("std", 1e-6)):
            value = getattr(self, name)
            if not (
                isinstance(value, tuple) and len(value) == 3 and all(_is_number(v) and low <= v <= 1e4 for v in value)
            ):
                raise ConfigError(f"PreprocessConfig.{name} must be 3 numbers in [{low:g}, 1e4], got {value!r}")


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

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, (ResNetConfig, SwinConfig)):
            raise ConfigError(
                f"Mask2FormerConfig.backbone must be a backbone config, got {type(self.backbone).__name__}"
            )
        check_ints(
            self,
            num_classes=(1, 100_000),
            pixel_decoder_dim=(1, 8192),
            mask_dim=(1, 8192),
            pixel_decoder_layers=(0, 64),
            pixel_decoder_ffn_dim=(1, 65536),
            pixel_decoder_heads=(1, 256),
            deform_num_points=(1, 64),
            hidden_dim=(1, 8192),
            num_queries=(1, 10_000),
            decoder_layers=(1, 64),
            decoder_heads=(1, 256),
            decoder_ffn_dim=(1, 65536),
            train_num_points=(1, 10_000_000),
            test_topk_per_image=(1, 100_000),
        )
        check_floats(
            self,
            no_object_weight=(0.0, 1e3),
            class_weight=(0.0, 1e3),
            mask_weight=(0.0, 1e3),
            dice_weight=(0.0, 1e3),
            oversample_ratio=(1.0, 100.0),
            importance_sample_ratio=(0.0, 1.0),
            object_mask_threshold=(0.0, 1.0),
            overlap_threshold=(0.0, 1.0),
        )
        check_bools(self, "pre_norm", "enforce_input_projection")
        for width, heads in (("pixel_decoder_dim", "pixel_decoder_heads"), ("hidden_dim", "decoder_heads")):
            width_value, heads_value = getattr(self, width), getattr(self, heads)
            if width_value % heads_value:
                raise ConfigError(f"Mask2FormerConfig.{width}={width_value} is not divisible by {heads}={heads_value}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_kind(config: Any, kind: str) -> None:
    if config.kind != kind:
        raise ConfigError(f"{type(config).__name__}.kind must be {kind!r}, got {config.kind!r}")


def check_ints(config: Any, **ranges: tuple[int, int]) -> None:
    """Each named field is an int (not a bool) within its inclusive range."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if not (_is_int(value) and low <= value <= high):
            raise ConfigError(f"{type(config).__name__}.{name} must be an integer in [{low}, {high}], got {value!r}")


def check_floats(config: Any, **ranges: tuple[float, float]) -> None:
    """Each named field is a number within its inclusive range (NaN fails the comparison)."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if not (_is_number(value) and low <= value <= high):
            raise ConfigError(f"{type(config).__name__}.{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def check_bools(config: Any, *names: str) -> None:
    """Each named field is true or false (JSON's 0/1 or "yes" are refused)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{type(config).__name__}.{name} must be true or false, got {value!r}")


def _check_int_tuple(config: Any, name: str, bounds: tuple[int, int]) -> None:
    value = getattr(config, name)
    low, high = bounds
    if not (isinstance(value, tuple) and value and all(_is_int(v) and low <= v <= high for v in value)):
        raise ConfigError(f"{type(config).__name__}.{name} must be integers in [{low}, {high}], got {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-ready data (nested dataclasses become dicts, tuples lists)."""
    return dataclasses.asdict(config)


def backbone_config_from_dict(data: dict[str, Any]) -> BackboneConfig:
    """Inverse of ``config_to_dict`` for a backbone config, dispatching on ``kind``."""
    kinds: dict[str, type] = {"resnet": ResNetConfig, "swin": SwinConfig}
    kind = data.get("kind")
    if kind not in kinds:
        raise ConfigError(f"unknown backbone kind {kind!r}; expected one of {sorted(kinds)}")
    return _from_dict(kinds[kind], data)


def mask2former_config_from_dict(data: dict[str, Any]) -> Mask2FormerConfig:
    """Inverse of ``config_to_dict`` for a Mask2Former config."""
    if not isinstance(data, dict) or not isinstance(data.get("backbone"), dict):
        raise ConfigError(f"a Mask2Former config is an object with a 'backbone' object, got {str(data)[:100]}")
    data = dict(data)
    backbone = backbone_config_from_dict(data.pop("backbone"))
    return _from_dict(Mask2FormerConfig, data, backbone=backbone)


def _from_dict(cls: type, data: dict[str, Any], **overrides: Any) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    values.update(overrides)
    return cls(**values)
