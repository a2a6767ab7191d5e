"""Semantic segmentation metrics from a confusion matrix: mIoU, fwIoU, aAcc, mAcc.

Absent classes follow mmsegmentation (and detectron2's ``SemSegEvaluator``, which agrees):
a class's IoU is NaN only when it is absent from both ground truth and prediction (a class
predicted but never in the ground truth has IoU 0 and pulls mIoU down); its accuracy is NaN
when it is absent from the ground truth. Means skip NaN. fwIoU weights each class's IoU by its
share of ground-truth pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segscope.evaluation._inputs import as_label_map
from segscope.evaluation.distributed import all_reduce_sum_
from segscope.evaluation.table import format_table


class SemanticEvaluator:
    """Accumulates a ``[C, C]`` confusion matrix (rows: ground truth, columns: prediction).

    Args:
        num_classes: number of classes ``C``; labels are ``0 .. C-1``.
        ignore_index: ground-truth label of pixels left out of every metric.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> None:
        """Add one image (or a batch): ``pred`` and ``gt`` are integer label maps of one shape.

        ``pred`` holds class indices ``0 .. C-1`` wherever ``gt`` is not ``ignore_index``; its
        values on ignored pixels are not looked at.
        """
        pred = as_label_map(pred, "pred")
        gt = as_label_map(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(
                f"pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}"
            )
        valid = gt != self.ignore_index
        gt, pred = gt[valid], pred.to(gt.device)[valid]
        for name, labels in (("gt", gt), ("pred", pred)):
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():
                raise ValueError(
                    f"{name} has labels outside 0..{self.num_classes - 1} "
                    f"(ignore_index={self.ignore_index}): {labels[bad].unique()[:10].tolist()}"
                )
        counts = torch.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes).cpu()

    def compute(self) -> dict[str, Any]:
        """Metrics x100: ``mIoU``, ``fwIoU``, ``mAcc``, ``aAcc`` (floats) and per-class
        ``IoU`` and ``Acc`` (lists of ``C`` floats, NaN for absent classes, see module doc)."""
        cm = self.confusion.double()
        tp = cm.diagonal()
        gt_pixels = cm.sum(1)
        pred_pixels = cm.sum(0)
        # 0/0 gives NaN exactly for the absent classes.
        iou = tp / (gt_pixels + pred_pixels - tp)
        acc = tp / gt_pixels
        in_gt = gt_pixels > 0
        freq = gt_pixels / gt_pixels.sum()
        return {
            "mIoU": float(iou.nanmean()) * 100,
            "fwIoU": float((freq[in_gt] * iou[in_gt]).sum()) * 100 if in_gt.any() else float("nan"),
            "mAcc": float(acc.nanmean()) * 100,
            "aAcc": float(tp.sum() / gt_pixels.sum()) * 100,
            "IoU": (iou * 100).tolist(),
            "Acc": (acc * 100).tolist(),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the ``[C, C]`` int64 ``confusion`` matrix."""
        return {"confusion": self.confusion.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the confusion matrix by ``state["confusion"]``."""
        confusion = torch.as_tensor(state["confusion"], dtype=torch.int64)
        if confusion.shape != self.confusion.shape:
            raise ValueError(
                f"confusion has shape {tuple(confusion.shape)}, expected {tuple(self.confusion.shape)}"
            )
        self.confusion = confusion.clone()

    def merge(self, other: SemanticEvaluator) -> None:
        """Add ``other``'s confusion matrix (same ``num_classes`` and ``ignore_index``)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge SemanticEvaluators with different classes or ignore_index")
        self.confusion += other.confusion

    def sync(self) -> None:
        """Sum the confusion matrix over all ``torch.distributed`` processes, in place.

        Call it once, on every process, before ``compute``; a no-op outside distributed runs.
        """
        all_reduce_sum_([self.confusion])

    @staticmethod
    def format_table(results: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
        """Per-class IoU and Acc, then the summary (aAcc, mIoU, mAcc, fwIoU)."""
        num_classes = len(results["IoU"])
        names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"got {len(names)} class names for {num_classes} classes")
        per_class = format_table(
            ["class", "IoU", "Acc"],
            [[name, iou, acc] for name, iou, acc in zip(names, results["IoU"], results["Acc"])],
        )
        summary = format_table(
            ["", "aAcc", "mIoU", "mAcc", "fwIoU"],
            [["all", results["aAcc"], results["mIoU"], results["mAcc"], results["fwIoU"]]],
        )
        return f"{per_class}\n\n{summary}"
