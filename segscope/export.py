"""Results as files: pictures, segscope's JSON, and the formats the COCO tools read.

| format          | files (S = the image's output stem)            | read by                              |
| --------------- | ---------------------------------------------- | ------------------------------------ |
| `overlay`       | `S.png`, the segments drawn over the image      | people                               |
| `json`          | `S.json`, segments with COCO RLE masks          | `SegmentationResult.to_json` readers |
| `coco-results`  | `coco_results.json`, one list for all images    | `pycocotools.COCO.loadRes` (instance)|
| `coco-panoptic` | `panoptic/S.png` (RGB ids) + `panoptic.json`    | panopticapi `pq_compute` (panoptic)  |
| `label-png`     | `labels/S.png`, class index per pixel           | mmseg-style label maps (semantic)    |

``PredictionWriter`` plans every path before anything runs and refuses a plan that would write
over an input, over another output, or (unless ``overwrite``) over an existing file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from segscope.data.categories import CategorySet
from segscope.data.panoptic_png import id_to_rgb
from segscope.errors import OptionError
from segscope.evaluation.rle import masks_to_rle
from segscope.fileio import atomic_write
from segscope.results import SegmentationResult
from segscope.visualize import DrawStyle

FORMATS = ("overlay", "json", "coco-results", "coco-panoptic", "label-png")
# Formats that only one task produces; the others suit every task.
_FORMAT_TASK = {"coco-results": "instance", "coco-panoptic": "panoptic", "label-png": "semantic"}
# Formats whose records carry COCO image ids.
NEEDS_IMAGE_IDS = frozenset({"coco-results", "coco-panoptic"})


def parse_formats(text: str, task: str) -> tuple[str, ...]:
    """``"overlay,json"`` -> ``("overlay", "json")``, checked against ``FORMATS`` and the task."""
    formats = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise OptionError(f"unknown output format(s) {unknown or [text]}; choose from {', '.join(FORMATS)}")
    for name in formats:
        needed = _FORMAT_TASK.get(name)
        if needed is not None and needed != task:
            raise OptionError(
                f"format {name!r} holds {needed} results; this run's task is {task} (use --task {needed})"
            )
    return formats


def coco_results(result: SegmentationResult, image_id: int) -> list[dict[str, Any]]:
    """An instance result as COCO detection records: ``bbox`` is ``[x, y, w, h]``."""
    if result.boxes is None:
        raise OptionError(f"COCO results hold instances; this is a {result.task} result")
    records = []
    for rle, box, label_id, score in zip(masks_to_rle(result.masks), result.boxes, result.label_ids, result.scores):
        x0, y0, x1, y1 = (float(v) for v in box)
        records.append(
            {
                "image_id": image_id,
                "category_id": result.categories[int(label_id)].id,
                "segmentation": rle,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return records


def panoptic_annotation(result: SegmentationResult, image_id: int, file_name: str) -> dict[str, Any]:
    """A panoptic result's entry of a COCO panoptic JSON (``segments_info`` with COCO ids)."""
    if result.panoptic_seg is None or result.segments_info is None:
        raise OptionError(f"COCO panoptic output holds panoptic results; this is a {result.task} result")
    boxes = mask_util.toBbox(masks_to_rle(result.masks)) if len(result.masks) else []
    segments = [
        {
            "id": int(info["id"]),
            "category_id": int(info["category_id"]),
            "iscrowd": 0,
            "area": int(info["area"]),
            "bbox": [float(v) for v in box],
        }
        for info, box in zip(result.segments_info, boxes)
    ]
    return {"image_id": image_id, "file_name": file_name, "segments_info": segments}


def panoptic_png(result: SegmentationResult) -> Image.Image:
    """The panoptic id map as a COCO panoptic PNG (id = R + 256 G + 256^2 B, 0 = void)."""
    return Image.fromarray(id_to_rgb(result.panoptic_seg))


def label_png(result: SegmentationResult) -> Image.Image:
    """The semantic map as a PNG of class indices (8-bit, or 16-bit past 256 classes)."""
    if result.semantic_seg is None:
        raise OptionError(f"label PNGs hold semantic results; this is a {result.task} result")
    dtype = np.uint8 if len(result.categories) <= 256 else np.uint16
    return Image.fromarray(result.semantic_seg.astype(dtype))


def coco_categories(categories: CategorySet) -> list[dict[str, Any]]:
    """The ``categories`` list of a COCO panoptic JSON."""
    return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)} for c in categories]


def unique_stems(names: Sequence[str]) -> list[str]:
    """Output stems for input file names, distinct even where stems collide.

    ``a.jpg`` alone gives ``a``; ``a.jpg`` beside ``a.png`` gives ``a_jpg`` and ``a_png``.
    """
    stems = [Path(name).stem or "image" for name in names]
    clashing = {s for s in stems if stems.count(s) > 1}
    chosen = [Path(n).name.replace(".", "_") if s in clashing else s for n, s in zip(names, stems)]
    taken: set[str] = set()
    result = []
    for stem in chosen:
        candidate, n = stem, 1
        while candidate in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate)
        result.append(candidate)
    return result


@dataclass(frozen=True)
class ImageRecords:
    """One image's entries in the collection files: its ``images[]`` entry, COCO detections and
    COCO panoptic annotation (None unless coco-panoptic is written)."""

    image: dict[str, Any]
    detections: list[dict[str, Any]]
    panoptic: dict[str, Any] | None


class PredictionWriter:
    """Writes ``segscope predict``'s outputs for one run into ``out``.

    Args:
        out: the output folder.
        formats: a subset of ``FORMATS``.
        stems: one output stem per input (see ``unique_stems``).
        inputs: the input files (none for URLs); no output may land on one.
        image_ids: COCO image id per input, needed by the ``NEEDS_IMAGE_IDS`` formats.
        categories: the model's categories (for the panoptic JSON).
        overwrite: allow replacing files left by an earlier run.
        style: how the overlay pictures are drawn (default ``DrawStyle()``).
    """

    def __init__(
        self,
        out: Path,
        formats: Sequence[str],
        stems: Sequence[str],
        inputs: Sequence[Path],
        image_ids: Sequence[int] | None,
        categories: CategorySet,
        overwrite: bool = False,
        style: DrawStyle | None = None,
    ) -> None:
        if image_ids is None and NEEDS_IMAGE_IDS.intersection(formats):
            raise OptionError("formats coco-results and coco-panoptic need COCO image ids")
        self.out = out
        self.formats = tuple(formats)
        self.stems = list(stems)
        self.image_ids = list(image_ids) if image_ids is not None else None
        self.categories = categories
        self.style = style or DrawStyle()
        # Input index -> that image's records for the collection files, so that records written by
        # several processes (see ``records`` / ``add_records``) come out in input order.
        self._records: dict[int, ImageRecords] = {}
        check_output_paths(self.planned_paths(), inputs, overwrite)

    def per_image_paths(self, stem: str) -> dict[str, Path]:
        paths = {
            "overlay": self.out / f"{stem}.png",
            "json": self.out / f"{stem}.json",
            "coco-panoptic": self.out / "panoptic" / f"{stem}.png",
            "label-png": self.out / "labels" / f"{stem}.png",
        }
        return {name: path for name, path in paths.items() if name in self.formats}

    def collection_paths(self) -> dict[str, Path]:
        paths = {"coco-results": self.out / "coco_results.json", "coco-panoptic": self.out / "panoptic.json"}
        return {name: path for name, path in paths.items() if name in self.formats}

    def planned_paths(self) -> list[Path]:
        """Every file this run will write."""
        paths = [p for stem in self.stems for p in self.per_image_paths(stem).values()]
        return paths + list(self.collection_paths().values())

    def write(self, index: int, source: str, model_name: str, result: SegmentationResult) -> None:
        """Write input ``index``'s per-image files and keep its records for ``finish``."""
        stem = self.stems[index]
        paths = self.per_image_paths(stem)
        if "overlay" in paths:
            _write_png(paths["overlay"], result.draw(style=self.style))
        if "json" in paths:
            _write_json(paths["json"], {"source": source, "model": model_name, **result.to_json()})
        if "label-png" in paths:
            _write_png(paths["label-png"], label_png(result))
        if self.image_ids is None:
            return
        image_id = self.image_ids[index]
        height, width = result.image.shape[:2]
        image = {"id": image_id, "file_name": Path(source).name, "height": height, "width": width}
        detections = coco_results(result, image_id) if "coco-results" in self.formats else []
        panoptic = None
        if "coco-panoptic" in paths:
            _write_png(paths["coco-panoptic"], panoptic_png(result))
            panoptic = panoptic_annotation(result, image_id, paths["coco-panoptic"].name)
        self._records[index] = ImageRecords(image, detections, panoptic)

    def records(self) -> dict[int, ImageRecords]:
        """The collection-file records written so far, by input index (picklable, to gather them)."""
        return dict(self._records)

    def add_records(self, records: dict[int, ImageRecords]) -> None:
        """Take in records that another writer of the same plan (another process) wrote."""
        self._records.update(records)

    def finish(self) -> list[Path]:
        """Write the files that gather every image (COCO results, panoptic JSON); returns them."""
        written = []
        collections = self.collection_paths()
        records = [self._records[index] for index in sorted(self._records)]
        if "coco-results" in collections:
            written.append(_write_json(collections["coco-results"], [d for r in records for d in r.detections]))
        if "coco-panoptic" in collections:
            document = {
                "images": [r.image for r in records],
                "annotations": [r.panoptic for r in records if r.panoptic is not None],
                "categories": coco_categories(self.categories),
            }
            written.append(_write_json(collections["coco-panoptic"], document))
        return written


def check_output_paths(
    planned: Sequence[Path], inputs: Sequence[Path], overwrite: bool, input_kind: str = "image"
) -> None:
    """Refuse a plan that would write a file twice, over an input, or (unless ``overwrite``) over an
    existing file; raises ``OptionError`` naming the files (``input_kind`` names what inputs are)."""
    resolved = [os.path.realpath(p) for p in planned]
    if len(set(resolved)) != len(resolved):
        raise OptionError("two outputs of this run would share a file name")  # unique_stems prevents it
    sources = {os.path.realpath(p) for p in inputs}
    onto_inputs = [p for p, r in zip(planned, resolved) if r in sources]
    if onto_inputs:
        raise OptionError(f"output {onto_inputs[0]} would overwrite an input {input_kind}; choose another --out folder")
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OptionError(f"{shown}{more} already exist(s); pass --overwrite to replace them, or choose another --out")


def _write_png(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda stream: stream.write(buffer.getvalue()))


def _write_json(path: Path, document: Any) -> Path:
    return atomic_write(path, lambda stream: stream.write(json.dumps(document).encode()))
