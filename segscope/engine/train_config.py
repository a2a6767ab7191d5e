"""Training configurations: data, as named presets or JSON files."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from segscope.config import (
    BeitConfig,
    Mask2FormerConfig,
    PreprocessConfig,
    ResNetConfig,
    ViTAdapterConfig,
    check_bools,
    check_floats,
    check_ints,
    config_to_dict,
)
from segscope.data.categories import get_category_set
from segscope.errors import ConfigError, InputNotFoundError
from segscope.registry import model_config_from_dict
from segscope.zoo import DEMO_CONFIG, DEMO_PREPROCESS, get_entry


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
    # Gradient clipping over the whole model (detectron2's "full_model" clip type); 0 = none.
    clip_grad_norm: float = 0.01
    amp: bool = True  # mixed precision; only takes effect on CUDA
    # Layer-wise lr decay of a layered backbone (BEiT): block i of L trains at
    # lr * layer_decay ** (L - i), the patch embedding at layer_decay ** (L + 1); 1.0 = off.
    layer_decay: float = 1.0
    # BEiT's segmentation recipe also puts the decoder's query/level embeddings and its class
    # and mask heads at the bottom of that stack.
    layer_decay_head_embeddings: bool = False

    def __post_init__(self) -> None:
        check_floats(
            self,
            lr=(0.0, 10.0),
            weight_decay=(0.0, 10.0),
            backbone_lr_multiplier=(0.0, 100.0),
            poly_power=(0.0, 100.0),
            step_gamma=(0.0, 1.0),
            clip_grad_norm=(0.0, 1e6),
            layer_decay=(0.0, 1.0),
        )
        check_bools(self, "amp", "layer_decay_head_embeddings")
        check_ints(self, warmup_iters=(0, 10**9))
        if self.schedule not in ("poly", "step"):
            raise ConfigError(f"SolverConfig.schedule must be 'poly' or 'step', got {self.schedule!r}")
        if not all(isinstance(m, (int, float)) and 0 < m < 1 for m in self.step_milestones):
            raise ConfigError(f"SolverConfig.step_milestones must be fractions in (0, 1), got {self.step_milestones!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data directory and the work directory.

    ``task`` says what the data directory holds and what the model learns:

    * ``"panoptic"``: COCO panoptic, ``annotations/panoptic_{split}.json`` with the PNGs in
      ``panoptic_{split}/`` and the images in ``{split}/`` (``CocoPanopticDataset``); the
      categories are the JSON's.
    * ``"instance"``: COCO instances, ``annotations/instances_{split}.json`` and the images in
      ``{split}/`` (``CocoInstanceDataset``); the categories are the JSON's.
    * ``"semantic"``: images in ``semantic_image_dir`` and one single-channel label PNG each
      (contiguous class indices, 255 unlabeled) named ``<image stem><semantic_label_suffix>.png``
      in ``semantic_label_dir``, both folders relative to the data directory with ``{split}``
      replaced by the split. The defaults, ``{split}/`` and ``semantic_{split}/``, are the layout
      ``segscope eval --task semantic`` reads; mmseg's COCO-Stuff-164k is ``images/{split}``,
      ``annotations/{split}`` and ``_labelTrainIds`` with splits ``train2017`` and ``val2017``.
      Label PNGs carry no names: ``categories`` names the category set their indices refer to
      (``segscope.data.categories.get_category_set``, e.g. ``"coco_stuff"``).
    """

    name: str
    model: Any  # a registered architecture's config (segscope.registry)
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
    task: Literal["panoptic", "semantic", "instance"] = "panoptic"
    # Task "semantic" only (see the class docstring): the category set and the folder layout.
    categories: str | None = None
    semantic_image_dir: str = "{split}"
    semantic_label_dir: str = "semantic_{split}"
    semantic_label_suffix: str = ""
    # Evaluate on split_val every this many epochs and after the last (0: never while
    # training); the best checkpoint by the task's figure (PQ, mIoU, mask AP) is kept as best.pth.
    eval_interval: int = 0
    # Keep only the newest this many epoch_N.pth (0: keep all); best.pth is never removed.
    keep_checkpoints: int = 0
    # Write losses, learning rate and evaluation figures for TensorBoard to WORK_DIR/tensorboard.
    tensorboard: bool = True
    # Probability of Simple Copy-Paste (objects of another training image pasted on, after
    # both are jittered); panoptic and instance data only. 0: off.
    copy_paste: float = 0.0

    def __post_init__(self) -> None:
        check_ints(self, crop_size=(1, 16384), batch_size=(1, 65536), num_workers=(0, 1024), log_interval=(1, 10**9))
        check_ints(self, seed=(0, 2**63 - 1), eval_interval=(0, 10**6), keep_checkpoints=(0, 10**6))
        check_bools(self, "tensorboard")
        check_floats(self, min_scale=(1e-3, 100.0), max_scale=(1e-3, 100.0), copy_paste=(0.0, 1.0))
        if self.min_scale > self.max_scale:
            raise ConfigError(f"TrainConfig.min_scale {self.min_scale} exceeds max_scale {self.max_scale}")
        freeze = self.freeze_backbone_batchnorm
        if not (freeze is None or isinstance(freeze, bool)):
            raise ConfigError(f"TrainConfig.freeze_backbone_batchnorm must be true, false or null, got {freeze!r}")
        if self.task not in ("panoptic", "semantic", "instance"):
            raise ConfigError(f"TrainConfig.task must be 'panoptic', 'semantic' or 'instance', got {self.task!r}")
        if self.copy_paste and self.task == "semantic":
            raise ConfigError("TrainConfig.copy_paste pastes objects: it needs panoptic or instance data, not semantic")
        for name in ("semantic_image_dir", "semantic_label_dir", "semantic_label_suffix"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"TrainConfig.{name} must be a string, got {getattr(self, name)!r}")
        self._check_categories()

    def _check_categories(self) -> None:
        """``categories`` names a set of ``model.num_classes`` categories for task "semantic", else is None."""
        if self.task != "semantic":
            if self.categories is not None:
                raise ConfigError(
                    f"TrainConfig.categories ({self.categories!r}) is for task 'semantic'; "
                    f"{self.task} categories come from the annotation JSON"
                )
            return
        if not isinstance(self.categories, str):
            raise ConfigError(
                "TrainConfig.categories must name the category set of the label maps for task 'semantic' "
                f"(e.g. 'coco_stuff'), got {self.categories!r}"
            )
        try:
            count = len(get_category_set(self.categories))
        except ValueError as error:
            raise ConfigError(f"TrainConfig.categories: {error}") from error
        if count != self.model.num_classes:
            raise ConfigError(
                f"TrainConfig.categories {self.categories!r} has {count} categories but the model predicts "
                f"{self.model.num_classes} classes; set model.num_classes to match"
            )

    def semantic_dirs(self, root: Path, split: str) -> tuple[Path, Path]:
        """The image and label folders of ``split`` under ``root`` (task "semantic")."""
        return (
            root / self.semantic_image_dir.replace("{split}", split),
            root / self.semantic_label_dir.replace("{split}", split),
        )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        model = model_config_from_dict(data.pop("model"))
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

# ViT-Adapter's COCO panoptic recipe (its mmdet config): AdamW 1e-4 with layer decay 0.9 over
# the 24 BEiTv2 blocks, lr x0.1 at 72% and 89% of training, gradient norm clipped at 0.01,
# one image per GPU on 16 GPUs, from the BEiTv2-L ImageNet-21k weights. The original augments
# by multi-scale resizing (short side 480-800); this engine's large-scale jitter is Mask2Former's.
VITADAPTER_COCO_PANOPTIC = TrainConfig(
    name="vitadapter-beitv2-l-coco-panoptic",
    model=get_entry("vitadapter-beitv2-l-coco-panoptic").config,
    solver=SolverConfig(
        lr=1e-4,
        weight_decay=0.05,
        backbone_lr_multiplier=1.0,
        schedule="step",
        step_milestones=(191750 / 265500, 236000 / 265500),
        clip_grad_norm=0.01,
        layer_decay=0.9,
    ),
    batch_size=1,
    backbone_init="beitv2-l-in21k-224",
    # The adapter's BatchNorm layers are new (no ImageNet statistics): they train, synchronised.
    freeze_backbone_batchnorm=False,
    split_train="train2017",
    split_val="val2017",
)

# ViT-Adapter's COCO-Stuff-164k recipe (its mmseg config): AdamW 2e-5 with layer decay 0.9 (the
# decoder's embeddings and heads at the bottom of the stack, as its constructor does), linear
# warm-up over 1500 iterations, then poly decay (power 1) to 0, no gradient clipping; 896 crops
# of images rescaled 0.5-2x around short side 896; 16 images per iteration (2 per GPU on 8);
# from the BEiT-L ImageNet-22k weights. Data in mmseg's layout (images/, annotations/ with
# *_labelTrainIds.png label maps).
VITADAPTER_COCO_STUFF = TrainConfig(
    name="vitadapter-beit-l-cocostuff164k-semantic",
    task="semantic",
    categories="coco_stuff",
    model=get_entry("vitadapter-beit-l-cocostuff164k-semantic").config,
    solver=SolverConfig(
        lr=2e-5,
        weight_decay=0.05,
        backbone_lr_multiplier=1.0,
        schedule="poly",
        poly_power=1.0,
        warmup_iters=1500,
        clip_grad_norm=0.0,
        layer_decay=0.9,
        layer_decay_head_embeddings=True,
    ),
    crop_size=896,
    min_scale=0.5,
    max_scale=2.0,
    batch_size=2,
    backbone_init="beit-l-in22k-224",
    freeze_backbone_batchnorm=False,
    semantic_image_dir="images/{split}",
    semantic_label_dir="annotations/{split}",
    semantic_label_suffix="_labelTrainIds",
    split_train="train2017",
    split_val="val2017",
    preprocess=get_entry("vitadapter-beit-l-cocostuff164k-semantic").preprocess,
)

# Cascade Mask R-CNN + Swin-B on COCO instances: the Swin project's optimiser (AdamW 1e-4,
# weight decay 0.05, lr x0.1 at epochs 27 and 33 of 36, 500 warm-up iterations, no clipping),
# 16 images per iteration (2 per GPU on 8), from the Swin-B ImageNet-22k weights at 224 px;
# augmented, as the card was, by large-scale jitter at 1024 and Simple Copy-Paste on every image.
CASCADE_SWIN_B_COCO = TrainConfig(
    name="cascade-mask-rcnn-swin-b-coco-instance",
    task="instance",
    model=get_entry("cascade-mask-rcnn-swin-b-coco-instance").config,
    solver=SolverConfig(
        lr=1e-4,
        weight_decay=0.05,
        backbone_lr_multiplier=1.0,
        schedule="step",
        step_milestones=(27 / 36, 33 / 36),
        warmup_iters=500,
        clip_grad_norm=0.0,
    ),
    crop_size=1024,
    batch_size=2,
    copy_paste=1.0,
    backbone_init="swin-b-in22k-224",
    split_train="train2017",
    split_val="val2017",
)

# A ViT-Adapter small enough to train on the synthetic shapes on a CPU: BEiT of width 64,
# 4 blocks (one per interaction) over 128-pixel crops, the demo model's head; layer decay on.
TINY_VITADAPTER_SYNTHETIC = replace(
    TINY_SYNTHETIC,
    name="vitadapter-tiny-synthetic",
    model=replace(
        DEMO_CONFIG,
        backbone=ViTAdapterConfig(
            vit=BeitConfig(embed_dim=64, depth=4, num_heads=4, rel_pos_grid=8, drop_path_rate=0.1),
            conv_inplane=16,
            deform_num_heads=4,
            interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
        ),
    ),
    solver=replace(TINY_SYNTHETIC.solver, layer_decay=0.9),
)

TRAIN_CONFIGS: dict[str, TrainConfig] = {
    c.name: c
    for c in (
        TINY_SYNTHETIC,
        R50_COCO_PANOPTIC,
        VITADAPTER_COCO_PANOPTIC,
        VITADAPTER_COCO_STUFF,
        TINY_VITADAPTER_SYNTHETIC,
        CASCADE_SWIN_B_COCO,
    )
}


def apply_overrides(config: Any, assignments: Sequence[str]) -> Any:
    """``config`` with ``key=value`` assignments applied (``solver.lr=2e-4``, ``model.backbone.
    drop_path_rate=0.2``, ``crop_size=512``): keys are dotted field paths into the nested
    configs, values JSON (lists become tuples; anything that is not JSON is a string). Every
    changed config is checked again; ``ConfigError`` names a bad key or value."""
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        if not separator or not key:
            raise ConfigError(f"an override is key=value (e.g. solver.lr=2e-4), got {assignment!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        config = _replace_path(config, key.split("."), _tuples({"v": value})["v"], key)
    return config


def _replace_path(config: Any, path: list[str], value: Any, key: str) -> Any:
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"override {key}: {type(config).__name__} has no fields")
    names = [f.name for f in dataclasses.fields(config)]
    if path[0] not in names:
        raise ConfigError(f"override {key}: {type(config).__name__} has no field {path[0]!r}; it has {names}")
    if len(path) > 1:
        value = _replace_path(getattr(config, path[0]), path[1:], value, key)
    return replace(config, **{path[0]: value})


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
