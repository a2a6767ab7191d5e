"""mIoU / aAcc / mAcc / fwIoU against hand-computed confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segscope.evaluation.semantic import SemanticEvaluator

# Three classes and two ignored pixels, whose (wrong) predictions must not count.
GT = np.array([[0, 0, 0, 1], [1, 2, 255, 255]])
PRED = np.array([[0, 0, 1, 1], [2, 2, 0, 1]])
# Confusion (rows gt, columns pred): [[2, 1, 0], [0, 1, 1], [0, 0, 1]].


def test_confusion_matrix_skips_ignored_pixels() -> None:
    ev = SemanticEvaluator(3)
    ev.update(PRED, GT)
    assert ev.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_metrics_match_the_hand_computed_confusion_matrix() -> None:
    ev = SemanticEvaluator(3)
    ev.update(torch.from_numpy(PRED), torch.from_numpy(GT))
    r = ev.compute()
    # tp = [2, 1, 1], gt pixels = [3, 2, 1], pred pixels = [2, 2, 2], union = [3, 3, 2].
    assert r["IoU"] == pytest.approx([100 * 2 / 3, 100 * 1 / 3, 100 * 1 / 2])
    assert r["Acc"] == pytest.approx([100 * 2 / 3, 100 * 1 / 2, 100.0])
    assert r["mIoU"] == pytest.approx(100 * (2 / 3 + 1 / 3 + 1 / 2) / 3)  # 50
    assert r["mAcc"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    assert r["aAcc"] == pytest.approx(100 * 4 / 6)
    # fwIoU: gt frequencies 3/6, 2/6, 1/6.
    assert r["fwIoU"] == pytest.approx(100 * (3 / 6 * 2 / 3 + 2 / 6 * 1 / 3 + 1 / 6 * 1 / 2))


def test_absent_classes_are_nan_and_left_out_of_the_means() -> None:
    # Five classes: 2 and 3 appear nowhere; 4 is predicted once but never in the gt.
    ev = SemanticEvaluator(5)
    ev.update(np.array([0, 4, 1, 1]), np.array([0, 0, 1, 1]))
    r = ev.compute()
    # IoU = [1/2, 2/2, nan, nan, 0/1]: class 4 counts in mIoU with 0, classes 2 and 3 do not.
    assert r["IoU"][:2] == pytest.approx([50.0, 100.0])
    assert math.isnan(r["IoU"][2]) and math.isnan(r["IoU"][3])
    assert r["IoU"][4] == 0.0
    assert r["mIoU"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    # Acc = [1/2, 2/2, nan, nan, nan]: classes absent from the gt have no accuracy.
    assert all(math.isnan(a) for a in r["Acc"][2:])
    assert r["mAcc"] == pytest.approx(75.0)
    assert r["aAcc"] == pytest.approx(75.0)
    assert r["fwIoU"] == pytest.approx(100 * (0.5 * 0.5 + 0.5 * 1.0))


def test_updates_accumulate_and_merge_like_one_big_image() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, size=(8, 8)) for _ in range(3)]
    preds = [rng.integers(0, 4, size=(8, 8)) for _ in range(3)]
    for gt in gts:
        gt[0] = 255
    whole = SemanticEvaluator(4)
    whole.update(np.concatenate(preds), np.concatenate(gts))
    first, second = SemanticEvaluator(4), SemanticEvaluator(4)
    first.update(preds[0], gts[0])
    for pred, gt in zip(preds[1:], gts[1:]):
        second.update(pred, gt)
    first.merge(second)
    assert torch.equal(first.confusion, whole.confusion)
    restored = SemanticEvaluator(4)
    restored.load_state_dict(whole.state_dict())
    assert restored.compute() == whole.compute()


def test_custom_ignore_index_and_uint8_inputs() -> None:
    ev = SemanticEvaluator(3, ignore_index=0)
    ev.update(np.array([1, 2, 2], dtype=np.uint8), np.array([0, 2, 1], dtype=np.uint8))
    assert ev.confusion.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_out_of_range_labels_raise_unless_ignored() -> None:
    ev = SemanticEvaluator(3)
    ev.update(np.array([255, 0]), np.array([255, 0]))  # prediction on an ignored pixel: fine
    with pytest.raises(ValueError, match="pred has labels outside 0..2"):
        ev.update(np.array([3, 0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="gt has labels outside 0..2"):
        ev.update(np.array([0, 0]), np.array([7, 0]))
    with pytest.raises(ValueError, match="same shape"):
        ev.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))


def test_format_table_has_class_rows_and_summary() -> None:
    ev = SemanticEvaluator(3)
    ev.update(PRED, GT)
    table = SemanticEvaluator.format_table(ev.compute(), ["road", "car", "sky"])
    assert "road" in table and "sky" in table
    summary = table.split("\n\n")[1].splitlines()
    assert summary[0].split()[:4] == ["|", "aAcc", "mIoU", "mAcc"]
    assert summary[2].split()[3] == "50.00"  # mIoU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_give_the_cpu_confusion_matrix() -> None:
    cpu, cuda = SemanticEvaluator(3), SemanticEvaluator(3)
    cpu.update(PRED, GT)
    cuda.update(torch.from_numpy(PRED).cuda(), torch.from_numpy(GT).cuda())
    assert torch.equal(cuda.confusion, cpu.confusion)
