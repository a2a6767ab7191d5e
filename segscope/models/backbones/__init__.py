"""Image encoders returning four feature maps at strides 4-32; ``build_backbone`` makes one."""

from __future__ import annotations

from segscope.config import BackboneConfig, ResNetConfig, SwinConfig, ViTAdapterConfig
from segscope.models.backbones.base import OUT_STRIDES, Backbone
from segscope.models.backbones.resnet import ResNet
from segscope.models.backbones.swin import Swin
from segscope.models.backbones.vit_adapter import ViTAdapter

__all__ = ["OUT_STRIDES", "Backbone", "ResNet", "Swin", "ViTAdapter", "build_backbone"]


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The randomly initialized backbone that ``cfg`` describes; ValueError for bad settings."""
    if isinstance(cfg, ResNetConfig):
        return ResNet(cfg)
    if isinstance(cfg, SwinConfig):
        return Swin(cfg)
    if isinstance(cfg, ViTAdapterConfig):
        return ViTAdapter(cfg)
    raise ValueError(f"no backbone is registered for config type {type(cfg).__name__}")
