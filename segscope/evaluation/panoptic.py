"""Panoptic Quality (Kirillov et al., 2019) with the COCO panoptic rules of ``panopticapi``.

Per image, a predicted and a ground-truth segment match when they have the same category and
``IoU > 0.5``, where the predicted segment's pixels on VOID are left out of the union. Matches
are unique at that threshold, so no assignment is solved. Crowd ground truth is never a true
positive nor a false negative; an unmatched predicted segment is not a false positive when
more than half of it lies on VOID or on its category's crowd region. VOID is segment id 0.

Two rules follow panopticapi where it is odd, because its figures are the ones users compare:
- of several crowd segments of one category in an image, only the one listed last in
  ``segments_info`` excuses predictions (panopticapi keeps one crowd id per category in a dict);
  COCO has at most one per category, so this only matters for other data;
- a non-zero id in a map that its segment list does not name is refused: panopticapi raises for
  such a predicted id and silently counts such a ground-truth id as neither VOID nor a segment.

Per category the evaluator keeps TP, FP, FN and the sum of matched IoUs; PQ = IoU sum /
(TP + FP/2 + FN/2), SQ = IoU sum / TP, RQ = TP / (TP + FP/2 + FN/2), averaged over the
categories with TP + FP + FN > 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segscope.data.annotations import check_segments_listed
from segscope.evaluation._inputs import as_label_map
from segscope.evaluation.distributed import all_reduce_sum_
from segscope.evaluation.table import format_table

_COUNTERS = ("tp", "fp", "fn", "iou")
_GROUPS = {"All": None, "Things": True, "Stuff": False}


class PanopticEvaluator:
    """Accumulates PQ statistics one image at a time.

    Args:
        categories: the dataset's categories: an object with ``.ids`` and ``.isthing``
            sequences (a ``CategorySet``), or a sequence of ``(id, isthing)`` pairs, of dicts
            with ``"id"`` and ``"isthing"`` (COCO JSON) or of objects with ``.id`` and
            ``.isthing``.
    """

    def __init__(self, categories: Any) -> None:
        ids, isthing = _parse_categories(categories)
        self.category_ids: tuple[int, ...] = ids
        self.isthing: tuple[bool, ...] = isthing
        self._index = {cid: k for k, cid in enumerate(ids)}
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        n = len(self.category_ids)
        self.tp = torch.zeros(n, dtype=torch.int64)
        self.fp = torch.zeros(n, dtype=torch.int64)
        self.fn = torch.zeros(n, dtype=torch.int64)
        self.iou = torch.zeros(n, dtype=torch.float64)

    def update(
        self,
        pred_seg: torch.Tensor | np.ndarray,
        pred_segments: Sequence[Mapping[str, Any]],
        gt_seg: torch.Tensor | np.ndarray,
        gt_segments: Sequence[Mapping[str, Any]],
    ) -> None:
        """Add one image.

        Args:
            pred_seg: ``[H, W]`` integer segment ids of the prediction (any device).
            pred_segments: ``{"id", "category_id"}`` per predicted segment; listed segments
                with no pixels are skipped (panopticapi would reject them).
            gt_seg: ``[H, W]`` integer segment ids of the ground truth.
            gt_segments: ``{"id", "category_id", "iscrowd"?, "area"?}`` per ground-truth
                segment. ``area`` (as in COCO panoptic JSON) is used when given, as panopticapi
                does; otherwise the segment's pixels are counted. ``iscrowd`` defaults to 0.

        Raises:
            AnnotationError: ``gt_seg`` holds a non-zero id that ``gt_segments`` does not list.
            ValueError: the same for the prediction, or malformed inputs.
        """
        pred_seg = as_label_map(pred_seg, "pred_seg")
        gt_seg = as_label_map(gt_seg, "gt_seg")
        if pred_seg.ndim != 2 or pred_seg.shape != gt_seg.shape:
            raise ValueError(
                f"pred_seg and gt_seg must be [H, W] of the same size, got "
                f"{tuple(pred_seg.shape)} and {tuple(gt_seg.shape)}"
            )
        pred_ids, pred_cat = self._parse_segments(pred_segments, "pred_segments")
        gt_ids, gt_cat = self._parse_segments(gt_segments, "gt_segments")
        check_segments_listed(torch.unique(pred_seg).tolist(), pred_segments, "pred_seg", "pred_segments", ValueError)
        check_segments_listed(torch.unique(gt_seg).tolist(), gt_segments, "gt_seg", "gt_segments")
        gt_crowd = torch.tensor([bool(s.get("iscrowd", 0)) for s in gt_segments], dtype=torch.bool)

        # inter[i, j]: pixels of gt segment i-1 and predicted segment j-1; row/column 0 is VOID.
        gt_index = _segment_index(gt_seg, gt_ids)
        pred_index = _segment_index(pred_seg.to(gt_seg.device), pred_ids)
        cols = len(pred_ids) + 1
        pairs = (gt_index * cols + pred_index).flatten()
        inter = torch.bincount(pairs, minlength=(len(gt_ids) + 1) * cols)
        inter = inter.reshape(len(gt_ids) + 1, cols).cpu().double()

        pred_area = inter[:, 1:].sum(0)
        pred_void = inter[0, 1:]
        gt_area = torch.tensor(
            [float(s["area"]) if "area" in s else math.nan for s in gt_segments],
            dtype=torch.float64,
        )
        gt_area = torch.where(gt_area.isnan(), inter[1:, :].sum(1), gt_area)
        overlap = inter[1:, 1:]

        same_cat = gt_cat[:, None] == pred_cat[None, :]
        union = pred_area[None, :] + gt_area[:, None] - overlap - pred_void[None, :]
        iou = overlap / union.where(union > 0, math.inf)
        match = same_cat & ~gt_crowd[:, None] & (iou > 0.5)

        gt_k, pred_k = match.nonzero(as_tuple=True)
        _increment(self.tp, gt_cat[gt_k])
        self.iou.index_add_(0, gt_cat[gt_k], iou[gt_k, pred_k])
        _increment(self.fn, gt_cat[~match.any(1) & ~gt_crowd])

        excusing_crowd = _last_per_category(gt_crowd, gt_cat)
        on_crowd = (overlap * (same_cat & excusing_crowd[:, None])).sum(0)
        ignored = (pred_void + on_crowd) > 0.5 * pred_area
        _increment(self.fp, pred_cat[~match.any(0) & ~ignored & (pred_area > 0)])

    def compute(self) -> dict[str, Any]:
        """PQ, SQ, RQ (x100) for ``"All"``, ``"Things"``, ``"Stuff"`` and ``"per_class"``.

        Groups hold ``{"PQ", "SQ", "RQ", "n"}`` averaged over their ``n`` categories with
        TP + FP + FN > 0 (NaN when ``n == 0``). ``"per_class"`` maps each dataset category id
        to ``{"PQ", "SQ", "RQ", "TP", "FP", "FN"}``; categories never seen get NaN where
        panopticapi writes 0. SQ of a seen category without TP is 0, as in panopticapi.
        """
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        denom = tp + 0.5 * fp + 0.5 * fn
        seen = denom > 0
        # 0/0 leaves NaN for categories never seen; a seen category without TP has SQ 0.
        pq = self.iou / denom * 100
        rq = tp / denom * 100
        sq = torch.where(seen & (tp == 0), 0.0, self.iou / tp * 100)

        results: dict[str, Any] = {}
        isthing = torch.tensor(self.isthing, dtype=torch.bool)
        for name, thing in _GROUPS.items():
            members = seen if thing is None else seen & (isthing == thing)
            n = int(members.sum())
            results[name] = {
                "PQ": _mean(pq, members),
                "SQ": _mean(sq, members),
                "RQ": _mean(rq, members),
                "n": n,
            }
        results["per_class"] = {
            cid: {
                "PQ": float(pq[k]),
                "SQ": float(sq[k]),
                "RQ": float(rq[k]),
                "TP": int(self.tp[k]),
                "FP": int(self.fp[k]),
                "FN": int(self.fn[k]),
            }
            for k, cid in enumerate(self.category_ids)
        }
        return results

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the counters ``tp``, ``fp``, ``fn`` (int64) and ``iou`` (float64), each ``[C]``."""
        return {name: getattr(self, name).clone() for name in _COUNTERS}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the counters by ``state`` (as returned by ``state_dict``)."""
        for name in _COUNTERS:
            value = torch.as_tensor(state[name], dtype=getattr(self, name).dtype)
            if value.shape != getattr(self, name).shape:
                raise ValueError(
                    f"state {name!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(getattr(self, name).shape)}"
                )
            setattr(self, name, value.clone())

    def merge(self, other: PanopticEvaluator) -> None:
        """Add ``other``'s counters to this evaluator's (same categories required)."""
        if other.category_ids != self.category_ids:
            raise ValueError("cannot merge PanopticEvaluators built on different categories")
        for name in _COUNTERS:
            getattr(self, name).add_(getattr(other, name))

    def sync(self) -> None:
        """Sum the counters over all ``torch.distributed`` processes, in place.

        Call it once, on every process, before ``compute``; a no-op outside distributed runs.
        """
        all_reduce_sum_([getattr(self, name) for name in _COUNTERS])

    @staticmethod
    def format_table(results: Mapping[str, Any]) -> str:
        """The panopticapi summary: PQ, SQ, RQ and #categories for All, Things and Stuff."""
        rows = [
            [name, results[name]["PQ"], results[name]["SQ"], results[name]["RQ"], results[name]["n"]]
            for name in _GROUPS
        ]
        return format_table(["", "PQ", "SQ", "RQ", "#categories"], rows, digits=3)

    def _parse_segments(
        self, segments: Sequence[Mapping[str, Any]], name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment ids and contiguous category indices, ``[K]`` int64 each."""
        ids, cats = [], []
        for s in segments:
            if s["id"] == 0:
                raise ValueError(f"{name}: segment id 0 is VOID and cannot be a segment")
            if s["category_id"] not in self._index:
                raise ValueError(f"{name}: unknown category_id {s['category_id']} (segment {s['id']})")
            ids.append(int(s["id"]))
            cats.append(self._index[s["category_id"]])
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: segment ids are not unique: {ids}")
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(cats, dtype=torch.int64)


def _last_per_category(flags: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
    """``[K]`` bool: the last flagged segment of each category (panopticapi's crowd lookup)."""
    last = torch.zeros_like(flags)
    seen: set[int] = set()
    for k in reversed(range(len(flags))):
        if flags[k] and int(categories[k]) not in seen:
            last[k] = True
            seen.add(int(categories[k]))
    return last


def _segment_index(seg: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` position + 1 of each pixel's id in ``ids``, or 0 (VOID) for unlisted ids."""
    if len(ids) == 0:
        return torch.zeros_like(seg)
    ids = ids.to(seg.device)
    order = ids.argsort()
    sorted_ids = ids[order]
    pos = torch.searchsorted(sorted_ids, seg).clamp(max=len(ids) - 1)
    return torch.where(sorted_ids[pos] == seg, order[pos] + 1, 0)


def _increment(counter: torch.Tensor, categories: torch.Tensor) -> None:
    """Add 1 to ``counter`` at each of ``categories`` (repeats add up)."""
    counter.index_add_(0, categories, torch.ones_like(categories))


def _mean(values: torch.Tensor, members: torch.Tensor) -> float:
    return float(values[members].mean()) if members.any() else math.nan


def _parse_categories(categories: Any) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    if hasattr(categories, "ids") and hasattr(categories, "isthing"):
        pairs: Iterable[tuple[Any, Any]] = zip(categories.ids, categories.isthing)
    else:
        pairs = (_category_pair(c) for c in categories)
    ids, isthing = [], []
    for cid, thing in pairs:
        ids.append(int(cid))
        isthing.append(bool(thing))
    if not ids:
        raise ValueError("categories is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"category ids are not unique: {ids}")
    return tuple(ids), tuple(isthing)


def _category_pair(category: Any) -> tuple[Any, Any]:
    if isinstance(category, Mapping):
        return category["id"], category["isthing"]
    if hasattr(category, "id") and hasattr(category, "isthing"):
        return category.id, category.isthing
    cid, isthing = category
    return cid, isthing
