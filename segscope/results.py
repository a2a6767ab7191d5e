"""What segmenting one image returns: masks, labels, scores and the task's own maps."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from segscope.data.categories import CategorySet
from segscope.evaluation.rle import masks_to_rle
from segscope.visualize import DrawStyle, draw_instances, draw_segmentation, instance_colors

# Keys a result exposes as a mapping, in this order, when the task produces them.
_KEYS = ("masks", "labels", "scores", "boxes", "panoptic_seg", "segments_info", "semantic_seg")


@dataclass
class SegmentationResult(Mapping[str, Any]):
    """One image's segmentation; also a read-only mapping over the fields the task fills.

    Attributes:
        task: "panoptic", "semantic" or "instance".
        image: the input as loaded, HxWx3 uint8 RGB (for drawing).
        masks: N x H x W bool, one mask per segment / class / instance.
        labels: N class names.
        label_ids: N contiguous class indices into ``categories``.
        scores: N confidences in [0, 1].
        boxes: instance task only, N x 4 (x0, y0, x1, y1) in pixels.
        panoptic_seg: panoptic task only, H x W int32 segment ids, 0 = void.
        segments_info: panoptic task only, one dict per segment (id, label, label_id,
            category_id, isthing, score, area).
        semantic_seg: semantic task only, H x W int64 class indices.
    """

    task: str
    image: np.ndarray
    masks: np.ndarray
    labels: list[str]
    label_ids: np.ndarray
    scores: np.ndarray
    categories: CategorySet = field(repr=False)
    boxes: np.ndarray | None = None
    panoptic_seg: np.ndarray | None = None
    segments_info: list[dict[str, Any]] | None = None
    semantic_seg: np.ndarray | None = None

    def _present(self) -> list[str]:
        return [key for key in _KEYS if getattr(self, key) is not None]

    def __getitem__(self, key: str) -> Any:
        if key not in self._present():
            raise KeyError(f"{key!r} is not part of a {self.task} result; keys: {self._present()}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def draw(self, show_scores: bool = True, style: DrawStyle | None = None) -> Image.Image:
        """A picture of the result over the image (overlay, or boxes and masks for instances).

        ``style`` sets opacity, captions, boxes and font size (see ``DrawStyle``); ``show_scores=False``
        leaves scores out whatever the style says. Instances of one class (instance task, panoptic
        things) get distinct shades of their class colour.
        """
        style = style or DrawStyle()
        scores = show_scores and style.scores
        base = [self.categories.categories[i].color for i in self.label_ids]
        options = {"alpha": style.alpha, "captions": style.labels, "font_size": style.font_size}
        if self.task == "instance":
            colors = instance_colors(base, self.label_ids)
            return draw_instances(
                self.image,
                self.masks,
                self.boxes,
                self.labels,
                self.scores if scores else None,
                colors,
                show_boxes=style.boxes is not False,
                **options,
            )
        if self.task == "panoptic":
            seg_map = self.panoptic_seg
            segments = [(info["id"], info["label"], info["score"] if scores else None) for info in self.segments_info]
            colors = instance_colors(base, self.label_ids)
        else:
            seg_map = self.semantic_seg
            segments = [(int(i), name, None) for i, name in zip(self.label_ids, self.labels)]
            colors = base
        return draw_segmentation(self.image, seg_map, segments, colors, show_boxes=bool(style.boxes), **options)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready segments with COCO RLE masks (and boxes, ids where the task has them)."""
        rles = masks_to_rle(self.masks)
        segments = []
        for i, rle in enumerate(rles):
            label_id = int(self.label_ids[i])
            record: dict[str, Any] = {
                "label": self.labels[i],
                "label_id": label_id,
                "category_id": self.categories.categories[label_id].id,
                "score": float(self.scores[i]),
                "area": int(self.masks[i].sum()),
                "segmentation": rle,
            }
            if self.boxes is not None:
                record["bbox"] = [float(v) for v in self.boxes[i]]
            if self.segments_info is not None:
                record["id"] = int(self.segments_info[i]["id"])
                record["isthing"] = bool(self.segments_info[i]["isthing"])
            segments.append(record)
        height, width = self.image.shape[:2]
        return {"task": self.task, "height": height, "width": width, "segments": segments}
