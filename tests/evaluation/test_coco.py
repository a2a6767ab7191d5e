"""COCO AP through CocoEvaluator: perfect predictions, pycocotools run directly, hand cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segscope.evaluation.coco import METRICS, CocoEvaluator
from segscope.evaluation.rle import masks_to_rle, rle_to_masks

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) pixel rectangle
Detection = tuple[int, Box, float]  # (category id, box, score)
# image id -> (height, width)
IMAGES = {1: (128, 128), 2: (96, 128)}
OBJECTS = [  # (image id, category id, box)
    (1, 1, (4, 4, 24, 24)),  # small: 400 px
    (1, 2, (28, 28, 128, 128)),  # large: 10000 px
    (2, 1, (10, 10, 60, 60)),  # medium: 2500 px
    (2, 2, (70, 40, 120, 90)),  # medium
]


def box_mask(image_id: int, box: Box) -> np.ndarray:
    mask = np.zeros(IMAGES[image_id], dtype=bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return mask


def make_gt(objects: list[tuple[int, int, Box]] = OBJECTS) -> dict:
    annotations = []
    for k, (image_id, cat, box) in enumerate(objects):
        x1, y1, x2, y2 = box
        annotations.append(
            {
                "id": k + 1,
                "image_id": image_id,
                "category_id": cat,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
                "segmentation": masks_to_rle(box_mask(image_id, box)[None])[0],
            }
        )
    return {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in IMAGES.items()],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def add_image(ev: CocoEvaluator, image_id: int, dets: list[Detection]) -> None:
    """Add ``dets`` to ``ev``, with the boxes' rectangles as masks."""
    h, w = IMAGES[image_id]
    masks = np.stack([box_mask(image_id, d[1]) for d in dets]) if dets else np.zeros((0, h, w), bool)
    ev.update(
        image_id,
        boxes=torch.tensor([d[1] for d in dets], dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor([d[2] for d in dets]),
        category_ids=torch.tensor([d[0] for d in dets], dtype=torch.int64),
        masks=torch.from_numpy(masks),
    )


def test_ground_truth_as_predictions_scores_ap_100() -> None:
    ev = CocoEvaluator(make_gt())
    for image_id in IMAGES:
        add_image(ev, image_id, [(cat, box, 1.0) for i, cat, box in OBJECTS if i == image_id])
    results = ev.compute()
    for iou_type in ("bbox", "segm"):
        assert [results[iou_type][m] for m in METRICS] == pytest.approx([100.0] * 6)
        assert results[iou_type]["per_class"] == pytest.approx({1: 100.0, 2: 100.0})


def jittered_detections(rng: np.random.Generator) -> dict[int, list[Detection]]:
    """1-2 noisy detections per object, some with the wrong category, plus spurious boxes."""
    dets: dict[int, list] = {i: [] for i in IMAGES}
    for image_id, cat, box in OBJECTS:
        h, w = IMAGES[image_id]
        for _ in range(rng.integers(1, 3)):
            x1, y1, x2, y2 = (np.array(box) + rng.integers(-6, 7, size=4)).tolist()
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
            det_cat = cat if rng.random() < 0.8 else 3 - cat
            dets[image_id].append((det_cat, (x1, y1, x2, y2), float(rng.random())))
    dets[2].append((1, (0, 0, 30, 20), 0.95))
    return dets


def pycocotools_stats(gt: dict, dets: dict, iou_type: str) -> list[float]:
    """COCOeval's six AP numbers (x100) with results built straight from the detections."""
    results = []
    for image_id, image_dets in dets.items():
        for cat, (x1, y1, x2, y2), score in image_dets:
            result = {"image_id": image_id, "category_id": cat, "score": score}
            if iou_type == "bbox":
                result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                mask = box_mask(image_id, (x1, y1, x2, y2))
                result["segmentation"] = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append(result)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [100 * s if s >= 0 else math.nan for s in coco_eval.stats[:6]]


def test_metrics_equal_pycocotools_run_directly() -> None:
    gt = make_gt()
    dets = jittered_detections(np.random.default_rng(0))
    ev = CocoEvaluator(gt)
    for image_id, image_dets in dets.items():
        add_image(ev, image_id, image_dets)
    results = ev.compute()
    for iou_type in ("bbox", "segm"):
        expected = pycocotools_stats(gt, dets, iou_type)
        assert [results[iou_type][m] for m in METRICS] == pytest.approx(expected, rel=1e-12, nan_ok=True)
        assert 0 < results[iou_type]["AP"] < 100  # the detections are neither perfect nor useless


ONE_IMAGE_TWO_OBJECTS = [(1, 1, (4, 4, 24, 24)), (1, 1, (40, 40, 80, 80))]


def test_one_of_two_objects_found_gives_ap_51_of_101() -> None:
    # Precision is 1 up to recall 0.5 and 0 beyond: 51 of COCO's 101 recall points (0, 0.01, ... 0.5).
    ev = CocoEvaluator(make_gt(ONE_IMAGE_TWO_OBJECTS))
    add_image(ev, 1, [(1, (4, 4, 24, 24), 0.9)])
    results = ev.compute()
    for iou_type in ("bbox", "segm"):
        assert results[iou_type]["AP"] == pytest.approx(100 * 51 / 101)


def test_a_higher_scored_false_positive_caps_precision_at_two_thirds() -> None:
    # Ranked: FP, TP, TP -> precision (0, 1/2, 2/3) at recall (0, 1/2, 1); interpolated, 2/3 everywhere.
    ev = CocoEvaluator(make_gt(ONE_IMAGE_TWO_OBJECTS))
    add_image(ev, 1, [(1, (90, 90, 120, 120), 0.9), (1, (4, 4, 24, 24), 0.8), (1, (40, 40, 80, 80), 0.7)])
    assert ev.compute()["bbox"]["AP"] == pytest.approx(100 * 2 / 3)


def test_images_without_predictions_score_zero_without_crashing() -> None:
    ev = CocoEvaluator(make_gt())
    for image_id in IMAGES:
        add_image(ev, image_id, [])
    results = ev.compute()
    for iou_type in ("bbox", "segm"):
        assert [results[iou_type][m] for m in METRICS] == [0.0] * 6
    assert "0.000" in CocoEvaluator.format_table(results)


def test_only_images_passed_to_update_are_evaluated() -> None:
    ev = CocoEvaluator(make_gt(), iou_types=("bbox",))
    add_image(ev, 1, [(cat, box, 1.0) for i, cat, box in OBJECTS if i == 1])
    results = ev.compute()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    # Image 1 has no medium object: nothing to score there.
    assert math.isnan(results["bbox"]["APm"])
    assert set(results) == {"bbox"}


def test_merge_and_state_dict_equal_one_evaluator(tmp_path: Path) -> None:
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(make_gt()))
    dets = jittered_detections(np.random.default_rng(1))
    whole, first, second = (CocoEvaluator(gt_path) for _ in range(3))
    for image_id, image_dets in dets.items():
        add_image(whole, image_id, image_dets)
    add_image(first, 1, dets[1])
    add_image(second, 2, dets[2])
    first.merge(second)
    restored = CocoEvaluator(gt_path)
    restored.load_state_dict(whole.state_dict())
    expected = whole.compute()
    for ev in (first, restored):
        results = ev.compute()
        for iou_type in ("bbox", "segm"):
            assert [results[iou_type][m] for m in METRICS] == pytest.approx(
                [expected[iou_type][m] for m in METRICS], nan_ok=True
            )
    with pytest.raises(ValueError, match="evaluated twice"):
        first.merge(whole)


def test_the_callers_ground_truth_dict_is_left_untouched() -> None:
    gt = make_gt()
    before = copy.deepcopy(gt)
    ev = CocoEvaluator(gt)
    add_image(ev, 1, [(1, (4, 4, 24, 24), 0.9)])
    ev.compute()
    assert gt == before


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    ev = CocoEvaluator(make_gt())
    with pytest.raises(ValueError, match="image_id 7 is not in the ground truth"):
        ev.update(7, np.zeros((0, 4)), np.ones(0), np.ones(0, dtype=np.int64), np.zeros((0, 9, 9), bool))
    with pytest.raises(ValueError, match="masks are required"):
        ev.update(1, np.zeros((1, 4)), np.ones(1), np.ones(1, dtype=np.int64))
    with pytest.raises(ValueError, match=r"masks of image 1 are \(64, 64\)"):
        ev.update(1, np.zeros((1, 4)), np.ones(1), np.ones(1, dtype=np.int64), np.zeros((1, 64, 64), bool))
    with pytest.raises(ValueError, match="category_ids not in the ground truth"):
        ev.update(1, np.zeros((1, 4)), np.ones(1), np.array([9]), np.zeros((1, 128, 128), bool))
    with pytest.raises(ValueError, match="1 boxes, 2 scores"):
        ev.update(1, np.zeros((1, 4)), np.ones(2), np.ones(1, dtype=np.int64), np.zeros((1, 128, 128), bool))
    add_image(ev, 1, [])
    with pytest.raises(ValueError, match="already added"):
        add_image(ev, 1, [])
    with pytest.raises(FileNotFoundError):
        CocoEvaluator(tmp_path / "missing.json")
    gt = make_gt()
    del gt["annotations"][0]["area"]
    with pytest.raises(ValueError, match="lacks \\['area'\\]"):
        CocoEvaluator(gt)


def test_masks_to_rle_is_json_ready_and_round_trips() -> None:
    masks = torch.zeros(3, 17, 23, dtype=torch.bool)
    masks[0, 2:9, 3:20] = True
    masks[1, :, 5] = True
    rles = masks_to_rle(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    decoded = rle_to_masks(json.loads(json.dumps(rles)))
    assert np.array_equal(decoded, masks.numpy())
    # Same encoding as pycocotools on one Fortran-ordered mask.
    direct = mask_util.encode(np.asfortranarray(masks[0].numpy().astype(np.uint8)))
    assert rles[0]["counts"] == direct["counts"].decode()
    assert masks_to_rle(np.zeros((0, 4, 4), bool)) == []
