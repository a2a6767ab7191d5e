"""COCO detection and instance segmentation AP, computed by pycocotools' ``COCOeval``.

Predictions are collected per image as COCO result dicts (``bbox`` in xywh, ``segmentation`` as
compressed RLE) and evaluated on exactly the images passed to ``update``, so that a subset of
a dataset can be evaluated and an image without predictions still counts its ground truth.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segscope.errors import InputNotFoundError
from segscope.evaluation.distributed import all_gather_objects
from segscope.evaluation.rle import masks_to_rle
from segscope.evaluation.table import format_table

IOU_TYPES = ("bbox", "segm")
# The first six entries of COCOeval.stats, in order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_REQUIRED_GT_KEYS = {
    "bbox": ("image_id", "category_id", "bbox", "area", "iscrowd"),
    "segm": ("image_id", "category_id", "segmentation", "area", "iscrowd"),
}

Array = torch.Tensor | np.ndarray


class CocoEvaluator:
    """Collects instance predictions and scores them with ``COCOeval``.

    Args:
        gt: COCO instances ground truth, as the parsed JSON dict (copied, never modified) or a
            path to the JSON file.
        iou_types: any of ``"bbox"`` and ``"segm"``.
    """

    def __init__(
        self, gt: Mapping[str, Any] | str | os.PathLike, iou_types: Sequence[str] = IOU_TYPES
    ) -> None:
        unknown = set(iou_types) - set(IOU_TYPES)
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
        self.iou_types = tuple(iou_types)
        self.coco_gt = _load_gt(gt, self.iou_types)
        self._image_sizes = {
            img["id"]: (img.get("height"), img.get("width")) for img in self.coco_gt.dataset["images"]
        }
        self._category_ids = set(self.coco_gt.getCatIds())
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        # image id -> iou type -> COCO result dicts
        self._predictions: dict[int, dict[str, list[dict[str, Any]]]] = {}

    def update(
        self,
        image_id: int,
        boxes: Array,
        scores: Array,
        category_ids: Array,
        masks: Array | None = None,
    ) -> None:
        """Add one image's ``N`` detections (``N`` may be 0; the image still counts).

        Args:
            image_id: the image's id in the ground truth; each image may be added once.
            boxes: ``[N, 4]`` boxes as ``(x1, y1, x2, y2)`` in pixels of the original image.
            scores: ``[N]`` confidences.
            category_ids: ``[N]`` dataset category ids (not contiguous indices).
            masks: ``[N, H, W]`` bool masks at the image's size; required for ``"segm"``.
        """
        image_id = int(image_id)
        if image_id not in self._image_sizes:
            raise ValueError(f"image_id {image_id} is not in the ground truth")
        if image_id in self._predictions:
            raise ValueError(f"image_id {image_id} was already added")
        boxes_np = _to_numpy(boxes, np.float64).reshape(-1, 4)
        scores_np = _to_numpy(scores, np.float64).reshape(-1)
        cats_np = _to_numpy(category_ids, np.int64).reshape(-1)
        n = len(boxes_np)
        if len(scores_np) != n or len(cats_np) != n:
            raise ValueError(
                f"got {n} boxes, {len(scores_np)} scores and {len(cats_np)} category_ids for image {image_id}"
            )
        unknown = set(cats_np.tolist()) - self._category_ids
        if unknown:
            raise ValueError(f"category_ids not in the ground truth: {sorted(unknown)}")

        common = [
            {"image_id": image_id, "category_id": int(c), "score": float(s)}
            for c, s in zip(cats_np, scores_np)
        ]
        predictions: dict[str, list[dict[str, Any]]] = {}
        if "bbox" in self.iou_types:
            xywh = np.concatenate([boxes_np[:, :2], boxes_np[:, 2:] - boxes_np[:, :2]], axis=1)
            predictions["bbox"] = [{**c, "bbox": b} for c, b in zip(common, xywh.tolist())]
        if "segm" in self.iou_types:
            rles = self._encode_masks(image_id, masks, n)
            predictions["segm"] = [{**c, "segmentation": r} for c, r in zip(common, rles)]
        self._predictions[image_id] = predictions

    def compute(self) -> dict[str, dict[str, Any]]:
        """Per IoU type: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (x100) and
        ``per_class`` (category id -> AP x100).

        Metrics without any ground truth to score (e.g. no large objects) are NaN, where
        COCOeval writes -1. With no predictions at all, AP is 0 wherever there is ground truth.
        """
        image_ids = sorted(self._predictions)
        results: dict[str, dict[str, Any]] = {}
        for iou_type in self.iou_types:
            # loadRes writes ids and areas into the dicts it gets: give it copies.
            dts = [dict(d) for p in self._predictions.values() for d in p[iou_type]]
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = _load_results(self.coco_gt, dts)
                coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
                coco_eval.params.imgIds = image_ids
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
            metrics = {name: _percent(v) for name, v in zip(METRICS, coco_eval.stats)}
            metrics["per_class"] = _per_class_ap(coco_eval)
            results[iou_type] = metrics
        return results

    def state_dict(self) -> dict[str, Any]:
        """The collected predictions, as plain picklable data."""
        return {"predictions": copy.deepcopy(self._predictions)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the collected predictions by ``state`` (as returned by ``state_dict``)."""
        self._predictions = copy.deepcopy(dict(state["predictions"]))

    def merge(self, other: CocoEvaluator) -> None:
        """Add ``other``'s predictions; each image must come from one evaluator only."""
        self._merge_predictions(other._predictions)

    def sync(self) -> None:
        """Gather every ``torch.distributed`` process's predictions into this evaluator.

        Call it once, on every process, before ``compute``; a no-op outside distributed runs.
        A sampler that pads ranks with repeated images makes it raise.
        """
        gathered = all_gather_objects(self._predictions)
        if len(gathered) == 1:
            return
        self._predictions = {}
        for predictions in gathered:
            self._merge_predictions(predictions)

    @staticmethod
    def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
        """One row per IoU type with AP, AP50, AP75, APs, APm, APl."""
        rows = [[iou_type, *(metrics[m] for m in METRICS)] for iou_type, metrics in results.items()]
        return format_table(["", *METRICS], rows, digits=3)

    def _merge_predictions(self, predictions: Mapping[int, dict[str, list[dict[str, Any]]]]) -> None:
        repeated = set(predictions) & set(self._predictions)
        if repeated:
            raise ValueError(f"images evaluated twice: {sorted(repeated)[:10]}")
        self._predictions.update(predictions)

    def _encode_masks(self, image_id: int, masks: Array | None, n: int) -> list[dict[str, Any]]:
        if masks is None:
            raise ValueError("masks are required when iou_types includes 'segm'")
        if masks.ndim != 3 or masks.shape[0] != n:
            raise ValueError(f"masks must be [{n}, H, W] for {n} boxes, got {tuple(masks.shape)}")
        height, width = self._image_sizes[image_id]
        if height is not None and tuple(masks.shape[1:]) != (height, width):
            raise ValueError(
                f"masks of image {image_id} are {tuple(masks.shape[1:])}, the image is {(height, width)}"
            )
        return masks_to_rle(masks)


def _load_gt(gt: Mapping[str, Any] | str | os.PathLike, iou_types: Sequence[str]) -> COCO:
    if isinstance(gt, (str, os.PathLike)):
        path = Path(gt)
        if not path.is_file():
            raise InputNotFoundError(f"COCO ground truth not found: {path}")
        with path.open() as f:
            data = json.load(f)
    elif isinstance(gt, Mapping):
        # COCOeval rewrites ground-truth segmentations in place.
        data = copy.deepcopy(dict(gt))
    else:
        raise ValueError(f"gt must be a COCO dict or a path, got {type(gt).__name__}")
    missing = {"images", "annotations", "categories"} - set(data)
    if missing:
        raise ValueError(f"COCO ground truth lacks {sorted(missing)}")
    required = {key for t in iou_types for key in _REQUIRED_GT_KEYS[t]}
    for ann in data["annotations"]:
        lacking = required - set(ann)
        if lacking:
            raise ValueError(f"COCO annotation {ann.get('id')} lacks {sorted(lacking)}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """``coco_gt.loadRes(results)``, or an empty result set (which loadRes cannot build)."""
    if results:
        return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _per_class_ap(coco_eval: COCOeval) -> dict[int, float]:
    # precision: [IoU thresholds, recall thresholds, categories, area ranges, max dets];
    # area "all" and the largest max dets, as COCOeval's headline AP.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    out = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        out[int(cat_id)] = float(p.mean()) * 100 if p.size else math.nan
    return out


def _percent(value: float) -> float:
    return float(value) * 100 if value >= 0 else math.nan


def _to_numpy(value: Array, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)
