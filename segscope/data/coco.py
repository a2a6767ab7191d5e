"""COCO-layout datasets: panoptic and instance segmentation.

Default layout under ``root`` (COCO's own; pass the folder arguments for another)::

    annotations/panoptic_{split}.json   annotations/instances_{split}.json
    panoptic_{split}/*.png              (RGB-encoded segment ids: R + 256 G + 256^2 B)
    {split}/*.jpg                       (images, named by each record's ``file_name``)

The JSON is parsed and every record checked when the dataset is built (see
``segscope.data.annotations``); images and PNGs are read, and checked against their record,
when an item is loaded. Items hold numpy arrays as decoded from the files; ``to_targets``
turns an item into the tensors Mask2Former trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from segscope.data.annotations import (
    ImageInfo,
    PanopticRecord,
    check_segments_listed,
    load_instances_json,
    load_panoptic_json,
)
from segscope.data.panoptic_png import rgb_to_id
from segscope.data.targets import panoptic_targets
from segscope.errors import AnnotationError, InputNotFoundError
from segscope.io import load_image


class CocoPanopticDataset(Dataset):
    """COCO panoptic segmentation: one item per annotated image.

    Args:
        root: the dataset folder.
        split: e.g. ``"train2017"``; names the default JSON, PNG folder and image folder.
        image_dir, panoptic_dir, annotation_file: override the default paths.

    Items are dicts: ``image`` ``[H, W, 3]`` uint8 RGB, ``pan_seg`` ``[H, W]`` int64 segment
    ids (0 is VOID), ``segments_info`` (list of ``{"id", "category_id", "iscrowd", "area",
    "bbox"}``), ``image_id`` and ``file_name``.

    Raises (on load of an item): ``FileNotFoundError`` for a missing image, ``AnnotationError``
    for a missing or unreadable PNG, a size mismatch, a listed segment absent from the PNG, or
    a non-zero PNG id that ``segments_info`` does not list.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        image_dir: str | Path | None = None,
        panoptic_dir: str | Path | None = None,
        annotation_file: str | Path | None = None,
    ) -> None:
        root = Path(root)
        self.annotation_file = Path(annotation_file or root / "annotations" / f"panoptic_{split}.json")
        self.image_dir = _existing_dir(image_dir or root / split, "image")
        self.panoptic_dir = _existing_dir(panoptic_dir or root / f"panoptic_{split}", "panoptic PNG")
        annotations = load_panoptic_json(self.annotation_file)
        self.categories = annotations.categories
        self.records = annotations.records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = _load_checked_image(self.image_dir / record.image.file_name, record.image, self.annotation_file)
        pan_seg = self._load_pan_seg(record)
        return {
            "image": image,
            "pan_seg": pan_seg,
            "segments_info": [dict(s) for s in record.segments_info],
            "image_id": record.image.id,
            "file_name": record.image.file_name,
        }

    def to_targets(self, item: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``labels [N]`` contiguous class indices and ``masks [N, H, W]`` bool, one per
        non-crowd segment (crowd segments are no target, as in Mask2Former's training)."""
        return panoptic_targets(item["pan_seg"], item["segments_info"], self.categories.id_to_index)

    def _load_pan_seg(self, record: PanopticRecord) -> np.ndarray:
        path = self.panoptic_dir / record.file_name
        where = f"{self.annotation_file}: annotation of image_id {record.image.id}"
        if not path.is_file():
            raise AnnotationError(f"{where}: panoptic PNG {path} does not exist")
        try:
            with Image.open(path) as png:
                mode, rgb = png.mode, np.asarray(png, dtype=np.int64)
        except (OSError, SyntaxError, ValueError) as error:
            raise AnnotationError(f"{where}: cannot read panoptic PNG {path}: {error}") from error
        if mode != "RGB":
            raise AnnotationError(f"{where}: panoptic PNG {path} must be RGB, got mode {mode}")
        _check_size(rgb.shape[:2], record.image, f"panoptic PNG {path}", where)
        pan_seg = rgb_to_id(rgb)
        present = set(np.unique(pan_seg).tolist())
        listed = {segment["id"] for segment in record.segments_info}
        absent = sorted(listed - present)
        if absent:
            raise AnnotationError(f"{where}: segment id {absent[0]} is listed but absent from {path}")
        check_segments_listed(present, record.segments_info, f"{where}: panoptic PNG {path}")
        return pan_seg


class CocoInstanceDataset(Dataset):
    """COCO instance segmentation: one item per image of the ``images`` list.

    Args:
        root: the dataset folder.
        split: e.g. ``"val2017"``; names the default JSON and image folder.
        image_dir, annotation_file: override the default paths.

    Items are dicts: ``image`` ``[H, W, 3]`` uint8, ``boxes`` ``[N, 4]`` float32 xyxy,
    ``labels`` ``[N]`` int64 contiguous class indices, ``masks`` ``[N, H, W]`` bool (polygons
    and RLE decoded with pycocotools), ``iscrowd`` ``[N]`` bool, ``annotation_ids`` ``[N]``
    int64, ``image_id`` and ``file_name``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        image_dir: str | Path | None = None,
        annotation_file: str | Path | None = None,
    ) -> None:
        root = Path(root)
        self.annotation_file = Path(annotation_file or root / "annotations" / f"instances_{split}.json")
        self.image_dir = _existing_dir(image_dir or root / split, "image")
        annotations = load_instances_json(self.annotation_file)
        self.categories = annotations.categories
        self.records = annotations.records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        info = record.image
        image = _load_checked_image(self.image_dir / info.file_name, info, self.annotation_file)
        annotations = record.annotations
        masks = np.zeros((len(annotations), info.height, info.width), dtype=bool)
        for k, annotation in enumerate(annotations):
            where = f"{self.annotation_file}: annotation id {annotation['id']}"
            masks[k] = decode_segmentation(annotation["segmentation"], info.height, info.width, where)
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return {
            "image": image,
            "boxes": boxes,
            "labels": np.array(
                [self.categories.id_to_index[a["category_id"]] for a in annotations], dtype=np.int64
            ),
            "masks": masks,
            "iscrowd": np.array([a["iscrowd"] for a in annotations], dtype=bool),
            "annotation_ids": np.array([a["id"] for a in annotations], dtype=np.int64),
            "image_id": info.id,
            "file_name": info.file_name,
        }

    def to_targets(self, item: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``labels [N]`` and ``masks [N, H, W]`` bool of the non-crowd instances."""
        keep = ~item["iscrowd"]
        return torch.from_numpy(item["labels"][keep]), torch.from_numpy(item["masks"][keep])


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "segmentation") -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as ``[H, W]`` bool.

    Follows pycocotools' ``COCO.annToRLE``: polygons of one object are merged into one mask.
    """
    try:
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            # pycocotools decodes runs without bounds checks: runs that do not add up to the
            # image would leave garbage in, or write past, the mask.
            total = sum(compressed_rle_counts(segmentation["counts"]))
            if total != height * width:
                raise ValueError(f"compressed RLE runs add up to {total} pixels, not {height} * {width}")
            rle = segmentation
        mask = mask_utils.decode(rle)
    except (TypeError, ValueError, KeyError) as error:
        raise AnnotationError(f"{where}: cannot decode segmentation: {error}") from error
    if mask.shape != (height, width):
        raise AnnotationError(f"{where}: segmentation decodes to {mask.shape}, expected {(height, width)}")
    return mask.astype(bool)


def compressed_rle_counts(counts: str | bytes) -> list[int]:
    """The run lengths of COCO's compressed RLE string (``pycocotools.mask.encode``).

    Each run is a variable-length number in 5-bit groups, one character (offset 48) per group,
    bit 0x20 meaning "more groups follow" and bit 0x10 of the last group the sign; from the
    fourth run on, each is stored as the difference to the run two before it.
    """
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise ValueError("compressed RLE string ends inside a number")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"invalid character {text[position]!r} in compressed RLE string")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            shift += 5
            position += 1
        if code & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("compressed RLE string decodes to a negative run")
        runs.append(value)
    return runs


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputNotFoundError(f"no such {what} folder: {path}")
    return path


def _load_checked_image(path: Path, info: ImageInfo, annotation_file: Path) -> np.ndarray:
    """The image at ``path`` (EXIF-rotated RGB), whose size must match its JSON record."""
    image = load_image(path)
    _check_size(image.shape[:2], info, f"image {path}", f"{annotation_file}: images entry id {info.id}")
    return image


def _check_size(shape: tuple[int, ...], info: ImageInfo, what: str, where: str) -> None:
    if tuple(shape) != (info.height, info.width):
        raise AnnotationError(
            f"{where}: {what} is {shape[1]}x{shape[0]} (WxH) but the record says {info.width}x{info.height}"
        )
