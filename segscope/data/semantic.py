"""Semantic segmentation from a folder of images and a folder of label PNGs (COCO-Stuff,
ADE20K style): each label pixel is a contiguous class index, ``ignore_index`` unlabeled."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from segscope.data.categories import CategorySet
from segscope.data.targets import semantic_targets
from segscope.errors import AnnotationError, InputNotFoundError
from segscope.io import list_images, load_image

# Single-channel modes whose pixel values are the stored integers (P: palette indices).
_LABEL_MODES = frozenset({"L", "P", "I", "I;16"})


class SemanticSegDataset(Dataset):
    """Images paired with ``label_dir/<image stem><label_suffix>.png`` label maps.

    Args:
        image_dir: folder of images.
        label_dir: folder of single-channel PNGs, one per image, named after its stem.
        ignore_index: label of unlabeled pixels (no target, no loss).
        categories: when given, every other label value must be below ``len(categories)``.
        label_suffix: what follows the image's stem in its label map's name (mmseg's
            COCO-Stuff: ``"_labelTrainIds"``).

    Items are dicts: ``image`` ``[H, W, 3]`` uint8, ``sem_seg`` ``[H, W]`` int64, ``image_id``
    (the stem) and ``file_name``.

    Raises:
        AnnotationError: an image without a label map (on construction); a label map that is
            not single-channel, has another size than its image, or holds an out-of-range
            value (on load of the item).
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        ignore_index: int = 255,
        categories: CategorySet | None = None,
        label_suffix: str = "",
    ) -> None:
        self.image_dir = Path(image_dir)
        self.label_dir = Path(label_dir)
        if not self.label_dir.is_dir():
            raise InputNotFoundError(f"no such label folder: {self.label_dir}")
        self.ignore_index = ignore_index
        self.categories = categories
        self.label_suffix = label_suffix
        self.images = list_images(self.image_dir)
        repeated = sorted(stem for stem, n in Counter(p.stem for p in self.images).items() if n > 1)
        if repeated:
            raise AnnotationError(f"{self.image_dir}: several images share the stem {repeated[0]!r}")
        labeled = {p.name for p in self.label_dir.glob("*.png")}
        for image in self.images:
            if self._label_path(image).name not in labeled:
                raise AnnotationError(f"{image}: no label map {self._label_path(image)}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.images[index]
        image = load_image(path)
        sem_seg = self._load_labels(self._label_path(path), image.shape[:2])
        return {"image": image, "sem_seg": sem_seg, "image_id": path.stem, "file_name": path.name}

    def to_targets(self, item: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``labels [K]`` and ``masks [K, H, W]`` bool, one per class present (ignore left out)."""
        return semantic_targets(item["sem_seg"], self.ignore_index)

    def _label_path(self, image: Path) -> Path:
        return self.label_dir / f"{image.stem}{self.label_suffix}.png"

    def _load_labels(self, path: Path, size: tuple[int, ...]) -> np.ndarray:
        try:
            with Image.open(path) as png:
                mode, labels = png.mode, np.asarray(png).astype(np.int64)
        except (OSError, SyntaxError, ValueError) as error:
            raise AnnotationError(f"cannot read label map {path}: {error}") from error
        if mode not in _LABEL_MODES:
            raise AnnotationError(f"label map {path} must be single-channel, got mode {mode}")
        if labels.shape != tuple(size):
            raise AnnotationError(
                f"label map {path} is {labels.shape[1]}x{labels.shape[0]} (WxH) but its image is {size[1]}x{size[0]}"
            )
        if self.categories is not None:
            values = np.unique(labels)
            bad = values[(values != self.ignore_index) & ((values < 0) | (values >= len(self.categories)))]
            if bad.size:
                named = ", ".join(str(v) for v in bad[:10].tolist())
                if bad.size > 10:
                    named += f" (+{bad.size - 10} more)"
                raise AnnotationError(
                    f"label map {path} holds label{'s' if bad.size > 1 else ''} {named}, outside "
                    f"0..{len(self.categories) - 1} and not the ignore index {self.ignore_index}"
                )
        return labels
