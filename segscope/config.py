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


@dataclass(frozen=True)
class BeitConfig:
    """A BEiT / BEiTv2 vision transformer (Bao et al., 2022) as a dense-prediction trunk.

    No absolute position embedding: every block has its own relative position bias table,
    sized for ``rel_pos_grid`` patches per side (global blocks) or for its attention window.
    ``window_sizes`` is empty when every block attends globally (BEiT, the COCO-Stuff card),
    else one entry per block: the side, in patches, of the square windows that block attends
    within (the image grid is zero-padded to whole windows, as in ViT-Adapter's BEiTv2
    detector), 0 for a global block. ``cls_token``: prepend a class token (the segmentation
    variant keeps it through the blocks; its bias table then has 3 extra entries).
    """

    kind: Literal["beit"] = "beit"
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.3
    cls_token: bool = True
    rel_pos_grid: int = 56
    window_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_kind(self, "beit")
        check_ints(
            self, patch_size=(1, 64), embed_dim=(1, 8192), depth=(1, 256), num_heads=(1, 256), rel_pos_grid=(1, 1024)
        )
        check_floats(self, mlp_ratio=(0.0, 64.0), layer_scale_init=(0.0, 1e3), drop_path_rate=(0.0, 1.0))
        check_bools(self, "qkv_bias", "cls_token")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"BeitConfig.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.window_sizes:
            _check_int_tuple(self, "window_sizes", (0, 1024))
            if len(self.window_sizes) != self.depth:
                raise ConfigError(
                    f"BeitConfig.window_sizes has {len(self.window_sizes)} entries for {self.depth} blocks"
                )
            if self.cls_token:
                raise ConfigError("BeitConfig: windowed attention has no place for a class token; set cls_token=false")


@dataclass(frozen=True)
class ViTAdapterConfig:
    """ViT-Adapter (Chen et al., 2023) around a BEiT: four maps at strides 4-32, all ``vit.embed_dim`` wide.

    A convolutional spatial prior (stem width ``conv_inplane``) feeds the transformer through
    an injector and reads it back through extractors (deformable attention with
    ``deform_num_heads`` heads, ``deform_num_points`` points, values ``deform_ratio`` as wide
    as the tokens; conv-FFN ``cffn_ratio`` as wide) around each span of blocks in
    ``interaction_indexes`` (first and last block, inclusive). ``vit_feature_per_interaction``:
    add each interaction's transformer output to its own map (the segmentation release), or
    the last one to all four (the detection release).
    """

    kind: Literal["vit_adapter"] = "vit_adapter"
    vit: BeitConfig = field(default_factory=BeitConfig)
    conv_inplane: int = 64
    deform_num_heads: int = 16
    deform_num_points: int = 4
    deform_ratio: float = 0.5
    cffn_ratio: float = 0.25
    interaction_indexes: tuple[tuple[int, int], ...] = ((0, 5), (6, 11), (12, 17), (18, 23))
    vit_feature_per_interaction: bool = True

    def __post_init__(self) -> None:
        _check_kind(self, "vit_adapter")
        if not isinstance(self.vit, BeitConfig):
            raise ConfigError(f"ViTAdapterConfig.vit must be a BeitConfig, got {type(self.vit).__name__}")
        check_ints(self, conv_inplane=(1, 4096), deform_num_heads=(1, 256), deform_num_points=(1, 64))
        check_floats(self, deform_ratio=(0.0, 16.0), cffn_ratio=(0.0, 16.0))
        check_bools(self, "vit_feature_per_interaction")
        value_dim = self.vit.embed_dim * self.deform_ratio
        if value_dim != int(value_dim) or int(value_dim) % self.deform_num_heads:
            raise ConfigError(
                f"ViTAdapterConfig: embed_dim*deform_ratio={value_dim:g} must be a whole number divisible by "
                f"deform_num_heads={self.deform_num_heads}"
            )
        spans = self.interaction_indexes
        expected_start = 0
        if not (isinstance(spans, tuple) and spans):
            raise ConfigError(f"ViTAdapterConfig.interaction_indexes must be (first, last) pairs, got {spans!r}")
        for span in spans:
            if not (isinstance(span, tuple) and len(span) == 2 and all(_is_int(v) for v in span)):
                raise ConfigError(f"ViTAdapterConfig.interaction_indexes must be (first, last) pairs, got {spans!r}")
            if span[0] != expected_start or span[1] < span[0]:
                raise ConfigError(
                    f"ViTAdapterConfig.interaction_indexes {spans!r} must cover the blocks in order without gaps"
                )
            expected_start = span[1] + 1
        if self.vit_feature_per_interaction and len(spans) != 4:
            raise ConfigError(
                f"ViTAdapterConfig: vit_feature_per_interaction adds one interaction's output to each of the "
                f"four maps, so it needs 4 interaction spans, got {len(spans)}"
            )
        if expected_start != self.vit.depth:
            raise ConfigError(
                f"ViTAdapterConfig.interaction_indexes {spans!r} end at block {expected_start - 1}, "
                f"but the transformer has {self.vit.depth} blocks"
            )


BackboneConfig = Union[ResNetConfig, SwinConfig, ViTAdapterConfig]


@dataclass(frozen=True)
class PreprocessConfig:
    """Test-time preprocessing: resize the short side, cap the long side, normalize, pad."""

    short_side: int = 800
    max_size: int = 1333
    size_divisibility: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # mmseg's ``ResizeToMultiple``: stretch the resized image up to the next multiple of
    # ``size_divisibility`` instead of zero-padding it.
    resize_to_multiple: bool = False
    # Semantic task only: run ``window`` x ``window`` crops every ``window_stride`` pixels and
    # average their class scores where they overlap (mmseg's slide inference); 0 = whole image.
    window: int = 0
    window_stride: int = 0

    def __post_init__(self) -> None:
        check_ints(
            self,
            short_side=(1, 16384),
            max_size=(1, 16384),
            size_divisibility=(0, 1024),
            window=(0, 16384),
            window_stride=(0, 16384),
        )
        check_bools(self, "resize_to_multiple")
        if (self.window == 0) != (self.window_stride == 0) or self.window_stride > self.window:
            raise ConfigError(
                f"PreprocessConfig: window={self.window} and window_stride={self.window_stride} must both be 0, "
                "or a stride no larger than the window (larger strides leave pixels unseen)"
            )
        for name, low in (("mean", -1e4), ("std", 1e-6)):
            value = getattr(self, name)
            if not (
                isinstance(value, tuple) and len(value) == 3 and all(_is_number(v) and low <= v <= 1e4 for v in value)
            ):
                raise ConfigError(f"PreprocessConfig.{name} must be 3 numbers in [{low:g}, 1e4], got {value!r}")


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Mask2Former: backbone, deformable-attention pixel decoder, masked-attention decoder."""

    architecture: Literal["mask2former"] = "mask2former"
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
        if self.architecture != "mask2former":
            raise ConfigError(f"Mask2FormerConfig.architecture must be 'mask2former', got {self.architecture!r}")
        if not isinstance(self.backbone, (ResNetConfig, SwinConfig, ViTAdapterConfig)):
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


@dataclass(frozen=True)
class CascadeMaskRCNNConfig:
    """Cascade Mask R-CNN (Cai and Vasconcelos, 2019) as the Swin project's mmdetection config:
    FPN P2-P6, RPN, three box stages (IoU 0.5/0.6/0.7) with GIoU regression, an FCN mask head."""

    architecture: Literal["cascade_mask_rcnn"] = "cascade_mask_rcnn"
    backbone: BackboneConfig = field(
        default_factory=lambda: SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    )
    num_classes: int = 80
    fpn_channels: int = 256
    head_conv_channels: int = 256
    head_fc_channels: int = 1024
    reg_class_agnostic: bool = False
    # Test-time selection (mmdet's test_cfg): proposals kept per image, then per-class NMS.
    rpn_test_proposals: int = 1000
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        _check_kind(self, "cascade_mask_rcnn", field_name="architecture")
        if not isinstance(self.backbone, (ResNetConfig, SwinConfig, ViTAdapterConfig)):
            raise ConfigError(f"CascadeMaskRCNNConfig.backbone must be a backbone config, got {self.backbone!r}")
        check_ints(
            self,
            num_classes=(1, 100_000),
            fpn_channels=(1, 8192),
            head_conv_channels=(1, 8192),
            head_fc_channels=(1, 65536),
            rpn_test_proposals=(1, 100_000),
            max_detections=(1, 100_000),
        )
        check_floats(self, score_threshold=(0.0, 1.0), nms_threshold=(0.0, 1.0))
        check_bools(self, "reg_class_agnostic")


def cascade_mask_rcnn_config_from_dict(data: dict[str, Any]) -> CascadeMaskRCNNConfig:
    """Inverse of ``config_to_dict`` for a Cascade Mask R-CNN config."""
    if not isinstance(data, dict) or not isinstance(data.get("backbone"), dict):
        raise ConfigError(f"a Cascade Mask R-CNN config is an object with a 'backbone' object, got {str(data)[:100]}")
    data = dict(data)
    backbone = backbone_config_from_dict(data.pop("backbone"))
    return _from_dict(CascadeMaskRCNNConfig, data, backbone=backbone)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_kind(config: Any, kind: str, field_name: str = "kind") -> None:
    value = getattr(config, field_name)
    if value != kind:
        raise ConfigError(f"{type(config).__name__}.{field_name} must be {kind!r}, got {value!r}")


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
    kinds: dict[str, type] = {"resnet": ResNetConfig, "swin": SwinConfig, "vit_adapter": ViTAdapterConfig}
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in kinds:
        raise ConfigError(f"unknown backbone kind {kind!r}; expected one of {sorted(kinds)}")
    if kind == "vit_adapter":
        data = dict(data)
        vit = data.pop("vit", None)
        if not isinstance(vit, dict) or vit.get("kind", "beit") != "beit":
            raise ConfigError(f"a ViT-Adapter config needs a BEiT 'vit' object, got {str(vit)[:100]}")
        spans = data.get("interaction_indexes")
        if isinstance(spans, list):
            data["interaction_indexes"] = tuple(tuple(s) if isinstance(s, list) else s for s in spans)
        return _from_dict(ViTAdapterConfig, data, vit=_from_dict(BeitConfig, vit))
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
