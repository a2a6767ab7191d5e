"""Training configurations: data, as named presets or JSON files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from segscope.config import (
    Mask2FormerConfig,
    PreprocessConfig,
    ResNetConfig,
    check_floats,
    check_ints,
    config_to_dict,
    mask2former_config_from_dict,
)
from segscope.errors import ConfigError, InputNotFoundError
from segscope.zoo import DEMO_CONFIG, DEMO_PREPROCESS


@dataclass(frozen=True)
class SolverConfig:
    """Optimizer, schedule and precision (defaults: Mask2Former's COCO recipe)."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_multiplier: float = 0.1
    schedule: Literal["poly", "step"] = "poly"
    poly_power: float = 0.9
    # Step schedule: fractions of the total iterations where the lr is multiplied by gamma.
    step_milestones: tuple[float, ...] = (0.889, 0.963)
    step_gamma: float = 0.1
    warmup_iters: int = 0
    # Gradient clipping over the whole model (detectron2's "full_model" clip type).
    clip_grad_norm: float = 0.01
    amp: bool = True  # mixed precision; only takes effect on CUDA

    def __post_init__(self) -> None:
        check_floats(
            self,
            lr=(0.0, 10.0),
            weight_decay=(0.0, 10.0),
            backbone_lr_multiplier=(0.0, 100.0),
            poly_power=(0.0, 100.0),
            step_gamma=(0.0, 1.0),
            clip_grad_norm=(0.0, 1e6),
        )
        check_ints(self, warmup_iters=(0, 10**9))
        if self.schedule not in ("poly", "step"):
            raise ConfigError(f"SolverConfig.schedule must be 'poly' or 'step', got {self.schedule!r}")
        if not all(isinstance(m, (int, float)) and 0 < m < 1 for m in self.step_milestones):
            raise ConfigError(f"SolverConfig.step_milestones must be fractions in (0, 1), got {self.step_milestones!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data directory and the work directory."""

    name: str
    model: Mask2FormerConfig
    solver: SolverConfig = field(default_factory=SolverConfig)
    crop_size: int = 1024  # large-scale jitter output size
    min_scale: float = 0.1
    max_scale: float = 2.0
    batch_size: int = 16  # per process
    num_workers: int = 4
    seed: int = 0
    log_interval: int = 20
    # ImageNet weights the backbone starts from: a name of
    # segscope.checkpoints.backbone_init.IMAGENET_WEIGHTS, a URL or a file (None: random).
    backbone_init: str | None = None
    # Keep the backbone's BatchNorm statistics and affine weights fixed, as detectron2's
    # FrozenBatchNorm does for a pretrained ResNet (per-GPU batches are too small to estimate
    # them well). None: frozen exactly when the backbone starts pretrained (backbone_init or a
    # whole-model init); a random backbone must learn them. No effect without BatchNorm (Swin).
    freeze_backbone_batchnorm: bool | None = None
    split_train: str = "train"
    split_val: str = "val"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        check_ints(self, crop_size=(1, 16384), batch_size=(1, 65536), num_workers=(0, 1024), log_interval=(1, 10**9))
        check_ints(self, seed=(0, 2**63 - 1))
        check_floats(self, min_scale=(1e-3, 100.0), max_scale=(1e-3, 100.0))
        if self.min_scale > self.max_scale:
            raise ConfigError(f"TrainConfig.min_scale {self.min_scale} exceeds max_scale {self.max_scale}")
        freeze = self.freeze_backbone_batchnorm
        if not (freeze is None or isinstance(freeze, bool)):
            raise ConfigError(f"TrainConfig.freeze_backbone_batchnorm must be true, false or null, got {freeze!r}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        model = mask2former_config_from_dict(data.pop("model"))
        solver = SolverConfig(**_tuples(data.pop("solver", {})))
        preprocess = PreprocessConfig(**_tuples(data.pop("preprocess", {})))
        return cls(model=model, solver=solver, preprocess=preprocess, **data)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


# The demo model's recipe: trains from scratch on the synthetic shapes on a CPU.
TINY_SYNTHETIC = TrainConfig(
    name="mask2former-tiny-synthetic",
    model=DEMO_CONFIG,
    solver=SolverConfig(lr=5e-4, weight_decay=0.05, backbone_lr_multiplier=1.0, warmup_iters=20, clip_grad_norm=1.0),
    crop_size=128,
    min_scale=0.5,
    max_scale=1.5,
    batch_size=8,
    num_workers=0,
    log_interval=10,
    preprocess=DEMO_PREPROCESS,
)

R50_COCO_PANOPTIC = TrainConfig(
    name="mask2former-r50-coco-panoptic",
    model=Mask2FormerConfig(backbone=ResNetConfig(depth=50), num_classes=133),
    # torchvision's ImageNet-1k ResNet-50: the torchvision-style R-50 (stride in the 3x3 conv)
    # that Mask2Former's R50 configs describe, instead of detectron2's MSRA caffe2 weights.
    backbone_init="torchvision-resnet50",
    split_train="train2017",
    split_val="val2017",
)

TRAIN_CONFIGS: dict[str, TrainConfig] = {c.name: c for c in (TINY_SYNTHETIC, R50_COCO_PANOPTIC)}


def load_train_config(name_or_path: str, **overrides: Any) -> TrainConfig:
    """A preset by name, or a JSON file written by ``TrainConfig.to_dict``; then overrides."""
    if name_or_path in TRAIN_CONFIGS:
        config = TRAIN_CONFIGS[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise InputNotFoundError(
                f"training config {name_or_path!r} is neither a preset ({', '.join(TRAIN_CONFIGS)}) nor a file"
            )
        try:
            config = TrainConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"malformed training config {path}: {error!r}") from error
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
