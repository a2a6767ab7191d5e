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
    config_to_dict,
    mask2former_config_from_dict,
)
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
    # Keep the backbone's BatchNorm statistics and affine weights fixed, as detectron2's
    # FrozenBatchNorm does when fine-tuning a pretrained ResNet (per-GPU batches are too
    # small to estimate them well). Has no effect on backbones without BatchNorm (Swin).
    freeze_backbone_batchnorm: bool = True
    split_train: str = "train"
    split_val: str = "val"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

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
            raise FileNotFoundError(
                f"training config {name_or_path!r} is neither a preset ({', '.join(TRAIN_CONFIGS)}) nor a file"
            )
        try:
            config = TrainConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise ValueError(f"malformed training config {path}: {error}") from error
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
