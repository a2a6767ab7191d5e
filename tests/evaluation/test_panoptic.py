"""PQ against hand-computed cases and against a per-segment transcription of panopticapi.

Images are 10x10 and segments are whole rows, so areas are multiples of 10 and every IoU
below is a ratio of small integers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segscope.data.categories import COCO_PANOPTIC
from segscope.data.panoptic_png import id_to_rgb
from segscope.errors import AnnotationError
from segscope.evaluation.panoptic import PanopticEvaluator

PERSON, CAR, SKY, GRASS = 1, 2, 3, 4
CATEGORIES = [(PERSON, True), (CAR, True), (SKY, False), (GRASS, False)]


def rows_map(spec: dict[int, range], fill: int = 0) -> np.ndarray:
    """A 10x10 id map: segment id -> the rows it covers; other rows hold ``fill``."""
    seg = np.full((10, 10), fill, dtype=np.int64)
    for segment_id, rows in spec.items():
        seg[list(rows)] = segment_id
    return seg


def segs(*items: tuple[int, int] | tuple[int, int, int]) -> list[dict]:
    """Segment records from ``(id, category_id[, iscrowd])`` tuples."""
    return [{"id": i[0], "category_id": i[1], "iscrowd": i[2] if len(i) > 2 else 0} for i in items]


def assert_group(result: dict, pq: float, sq: float, rq: float, n: int) -> None:
    assert result["n"] == n
    assert result["PQ"] == pytest.approx(pq)
    assert result["SQ"] == pytest.approx(sq)
    assert result["RQ"] == pytest.approx(rq)


def test_perfect_prediction_scores_100_everywhere() -> None:
    gt = rows_map({1: range(0, 3), 2: range(3, 5), 3: range(5, 10)})
    gt_segments = segs((1, PERSON), (2, CAR), (3, SKY))
    # Same segments under other ids: matching is by pixels, not ids.
    pred = rows_map({7: range(0, 3), 8: range(3, 5), 9: range(5, 10)})
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(pred, segs((7, PERSON), (8, CAR), (9, SKY)), gt, gt_segments)
    r = ev.compute()
    assert_group(r["All"], 100, 100, 100, n=3)
    assert_group(r["Things"], 100, 100, 100, n=2)
    assert_group(r["Stuff"], 100, 100, 100, n=1)
    # GRASS never appears: NaN per class and left out of the averages.
    assert math.isnan(r["per_class"][GRASS]["PQ"])


def test_iou_just_above_half_matches() -> None:
    # gt person: rows 0-1 (20 px); gt sky: rows 2-9 (80 px).
    gt = rows_map({1: range(0, 2), 2: range(2, 10)})
    # pred person: rows 0-1 plus 19 px of row 2-3 (39 px); pred sky: the other 61 px.
    pred = rows_map({5: range(0, 2), 6: range(2, 10)})
    pred[2, :] = 5
    pred[3, :9] = 5
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(pred, segs((5, PERSON), (6, SKY)), gt, segs((1, PERSON), (2, SKY)))
    r = ev.compute()
    # person: IoU = 20 / (20 + 39 - 20) = 20/39 > 0.5 -> TP.  sky: IoU = 61 / 80.
    person, sky = 100 * 20 / 39, 100 * 61 / 80
    assert r["per_class"][PERSON] == pytest.approx({"PQ": person, "SQ": person, "RQ": 100.0, "TP": 1, "FP": 0, "FN": 0})
    assert_group(r["Things"], person, person, 100, n=1)
    assert_group(r["Stuff"], sky, sky, 100, n=1)
    assert_group(r["All"], (person + sky) / 2, (person + sky) / 2, 100, n=2)


def test_iou_of_exactly_half_does_not_match() -> None:
    gt = rows_map({1: range(0, 2), 2: range(2, 10)})
    # pred person: rows 0-3 (40 px): IoU = 20 / 40 = 0.5, not > 0.5.  pred sky: rows 4-9.
    pred = rows_map({5: range(0, 4), 6: range(4, 10)})
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(pred, segs((5, PERSON), (6, SKY)), gt, segs((1, PERSON), (2, SKY)))
    r = ev.compute()
    # person: unmatched pred -> FP, unmatched gt -> FN: PQ = SQ = RQ = 0.
    assert r["per_class"][PERSON] == pytest.approx({"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 1, "FN": 1})
    # sky: IoU = 60 / 80 = 0.75, TP.
    assert_group(r["Things"], 0, 0, 0, n=1)
    assert_group(r["Stuff"], 75, 75, 100, n=1)
    assert_group(r["All"], (0 + 75) / 2, (0 + 75) / 2, (0 + 100) / 2, n=2)


def test_void_pixels_leave_the_union_and_excuse_predictions_mostly_on_void() -> None:
    # gt: person rows 0-1 (20 px), VOID rows 2-6 (50 px), grass rows 7-9 (30 px).
    gt = rows_map({1: range(0, 2), 4: range(7, 10)}, fill=0)
    gt_segments = segs((1, PERSON), (4, GRASS))
    pred = rows_map(
        {
            11: range(0, 3),  # person, 20 on gt person + 10 on VOID
            12: range(3, 6),  # car, 30 px all on VOID: ignored, not FP
            13: range(6, 8),  # car, 10 on VOID + 10 on grass: VOID share 0.5, not > 0.5: FP
            14: range(8, 10),  # grass, 20 px on gt grass
        }
    )
    pred_segments = segs((11, PERSON), (12, CAR), (13, CAR), (14, GRASS))
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(pred, pred_segments, gt, gt_segments)
    r = ev.compute()
    # person: IoU = 20 / (30 + 20 - 20 - 10 void) = 1.0.
    assert r["per_class"][PERSON]["PQ"] == pytest.approx(100)
    # car: one FP (segment 13) -> PQ 0; segment 12 is not counted.
    assert (r["per_class"][CAR]["FP"], r["per_class"][CAR]["TP"]) == (1, 0)
    # grass: IoU = 20 / (30 + 20 - 20) = 2/3.
    grass = 100 * 2 / 3
    assert r["per_class"][GRASS]["PQ"] == pytest.approx(grass)
    assert_group(r["Things"], (100 + 0) / 2, (100 + 0) / 2, (100 + 0) / 2, n=2)
    assert_group(r["Stuff"], grass, grass, 100, n=1)
    assert_group(r["All"], (100 + 0 + grass) / 3, (100 + 0 + grass) / 3, (100 + 0 + 100) / 3, n=3)


def test_crowd_region_is_never_tp_or_fn_and_excuses_same_class_predictions() -> None:
    # gt: person rows 0-1, person crowd rows 2-5 (40 px), sky rows 6-9.
    gt = rows_map({1: range(0, 2), 2: range(2, 6), 3: range(6, 10)})
    gt_segments = segs((1, PERSON), (2, PERSON, 1), (3, SKY))
    pred = rows_map(
        {
            21: range(0, 2),  # person = gt person: TP
            22: range(2, 5),  # person on the person crowd (IoU 0.75 with it): neither TP nor FP
            23: range(5, 6),  # car on the person crowd: crowd of another class, so FP
            24: range(6, 10),  # sky = gt sky: TP
        }
    )
    ev = PanopticEvaluator(CATEGORIES)
    ev.update(pred, segs((21, PERSON), (22, PERSON), (23, CAR), (24, SKY)), gt, gt_segments)
    r = ev.compute()
    assert r["per_class"][PERSON] == pytest.approx({"PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "TP": 1, "FP": 0, "FN": 0})
    assert r["per_class"][CAR] == pytest.approx({"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 1, "FN": 0})
    assert_group(r["Things"], 50, 50, 50, n=2)
    assert_group(r["Stuff"], 100, 100, 100, n=1)
    assert_group(r["All"], 200 / 3, 200 / 3, 200 / 3, n=3)


def two_images() -> list[tuple[np.ndarray, list[dict], np.ndarray, list[dict]]]:
    """Image 1: person TP, car missed (FN), sky TP (IoU 0.75).
    Image 2: spurious grass (FP), sky TP (IoU 0.7)."""
    gt1 = rows_map({1: range(0, 2), 2: range(2, 4), 3: range(4, 10)})
    pred1 = rows_map({1: range(0, 2), 2: range(2, 10)})
    gt2 = rows_map({1: range(0, 10)})
    pred2 = rows_map({1: range(0, 3), 2: range(3, 10)})
    return [
        (pred1, segs((1, PERSON), (2, SKY)), gt1, segs((1, PERSON), (2, CAR), (3, SKY))),
        (pred2, segs((1, GRASS), (2, SKY)), gt2, segs((1, SKY))),
    ]


def test_unmatched_predictions_are_fp_unmatched_gt_fn_and_things_stuff_split() -> None:
    ev = PanopticEvaluator(CATEGORIES)
    for image in two_images():
        ev.update(*image)
    r = ev.compute()
    counts = {c: tuple(r["per_class"][c][k] for k in ("TP", "FP", "FN")) for c in (1, 2, 3, 4)}
    assert counts == {PERSON: (1, 0, 0), CAR: (0, 0, 1), SKY: (2, 0, 0), GRASS: (0, 1, 0)}
    # sky: IoU sum = 60/80 + 70/100 = 1.45 over 2 TP -> SQ 72.5, RQ 100, PQ 72.5.
    assert r["per_class"][SKY]["PQ"] == pytest.approx(72.5)
    # Things: person (100, 100, 100), car (0, 0, 0).  Stuff: sky (72.5, 72.5, 100), grass (0, 0, 0).
    assert_group(r["Things"], 50, 50, 50, n=2)
    assert_group(r["Stuff"], 36.25, 36.25, 50, n=2)
    assert_group(r["All"], (100 + 72.5) / 4, (100 + 72.5) / 4, (100 + 100) / 4, n=4)


def test_merge_and_state_dict_give_the_same_result_as_one_evaluator() -> None:
    images = two_images()
    whole = PanopticEvaluator(CATEGORIES)
    for image in images:
        whole.update(*image)
    first, second = PanopticEvaluator(CATEGORIES), PanopticEvaluator(CATEGORIES)
    first.update(*images[0])
    second.update(*images[1])
    first.merge(second)
    assert first.compute() == whole.compute()

    restored = PanopticEvaluator(CATEGORIES)
    restored.load_state_dict(whole.state_dict())
    assert restored.compute() == whole.compute()
    restored.reset()
    assert restored.compute()["All"]["n"] == 0


def test_gt_area_from_the_annotation_is_used_like_panopticapi() -> None:
    gt = rows_map({1: range(0, 2)})
    pred = rows_map({1: range(0, 2)})
    ev = PanopticEvaluator(CATEGORIES)
    gt_segments = [{"id": 1, "category_id": PERSON, "iscrowd": 0, "area": 30}]
    ev.update(pred, segs((1, PERSON)), gt, gt_segments)
    # IoU = 20 / (20 + 30 - 20).
    assert ev.compute()["per_class"][PERSON]["SQ"] == pytest.approx(100 * 2 / 3)


def test_categories_accept_category_sets_dicts_records_and_pairs() -> None:
    class Flat:
        ids = [1, 2, 3, 4]
        isthing = [True, True, False, False]

    class Record:
        def __init__(self, id: int, isthing: bool) -> None:
            self.id, self.isthing = id, isthing

    records = [Record(c, t) for c, t in CATEGORIES]
    forms = [Flat(), records, [{"id": c, "isthing": int(t)} for c, t in CATEGORIES]]
    for form in forms:
        ev = PanopticEvaluator(form)
        assert (ev.category_ids, ev.isthing) == ((1, 2, 3, 4), (True, True, False, False))
    coco = PanopticEvaluator(COCO_PANOPTIC)
    assert (len(coco.category_ids), sum(coco.isthing)) == (133, 80)


def test_format_table_lists_all_things_and_stuff() -> None:
    ev = PanopticEvaluator(CATEGORIES)
    for image in two_images():
        ev.update(*image)
    table = PanopticEvaluator.format_table(ev.compute())
    lines = table.splitlines()
    assert "PQ" in lines[0] and "#categories" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["All", "Things", "Stuff"]
    assert "43.125" in lines[2]


def test_bad_inputs_raise_value_errors() -> None:
    ev = PanopticEvaluator(CATEGORIES)
    seg = rows_map({1: range(0, 10)})
    with pytest.raises(ValueError, match="unknown category_id 9"):
        ev.update(seg, segs((1, 9)), seg, segs((1, SKY)))
    with pytest.raises(ValueError, match="same size"):
        ev.update(seg[:5], segs((1, SKY)), seg, segs((1, SKY)))
    with pytest.raises(ValueError, match="integers"):
        ev.update(seg.astype(np.float32), segs((1, SKY)), seg, segs((1, SKY)))
    with pytest.raises(ValueError, match="VOID"):
        ev.update(seg, segs((0, SKY)), seg, segs((1, SKY)))
    with pytest.raises(ValueError, match="not unique"):
        ev.update(seg, segs((1, SKY), (1, GRASS)), seg, segs((1, SKY)))


def test_only_the_last_listed_crowd_segment_of_a_category_excuses_predictions() -> None:
    # gt: person rows 0-4 (50 px); person crowds A rows 5-6 and B rows 7-8 (20 px each); sky row 9.
    gt = rows_map({1: range(0, 5), 2: range(5, 7), 3: range(7, 9), 4: range(9, 10)})
    pred = rows_map(
        {
            11: range(0, 5),  # person = gt person: TP
            12: range(5, 7),  # person on crowd A only
            13: range(7, 9),  # person on crowd B only
            14: range(9, 10),  # sky = gt sky: TP
        }
    )
    pred_segments = segs((11, PERSON), (12, PERSON), (13, PERSON), (14, SKY))
    crowd_b_last = segs((1, PERSON), (2, PERSON, 1), (3, PERSON, 1), (4, SKY))
    crowd_a_last = segs((1, PERSON), (3, PERSON, 1), (2, PERSON, 1), (4, SKY))
    for gt_segments, excused, counted in ((crowd_b_last, 13, 12), (crowd_a_last, 12, 13)):
        ev = PanopticEvaluator(CATEGORIES)
        ev.update(pred, pred_segments, gt, gt_segments)
        person = ev.compute()["per_class"][PERSON]
        # panopticapi keeps one crowd id per category, the last listed: segment `excused` lies on it,
        # segment `counted` lies on the other crowd and is a false positive.
        assert (person["TP"], person["FP"], person["FN"]) == (1, 1, 0), (excused, counted)
        # PQ = IoU sum / (TP + FP/2 + FN/2) = 1 / 1.5; counting every crowd would give 100.
        assert person["PQ"] == pytest.approx(100 / 1.5)


def test_a_prediction_straddling_two_crowds_counts_void_plus_only_the_last_listed_one() -> None:
    # gt: person rows 0-3 (40 px), VOID row 4, person crowds A rows 5-6 and B rows 7-8, sky row 9.
    gt = rows_map({1: range(4), 2: range(5, 7), 3: range(7, 9), 4: range(9, 10)})
    pred = rows_map({11: range(4), 14: range(9, 10)})  # person TP, sky TP
    # Person 12 (30 px): 5 on VOID, 15 on crowd A, 10 on crowd B.
    pred[4, :5] = pred[5] = pred[6, :5] = pred[7] = 12
    pred_segments = segs((11, PERSON), (12, PERSON), (14, SKY))
    for crowd_order, person_fp in (((2, 3), 1), ((3, 2), 0)):  # the last of crowd_order excuses
        ev = PanopticEvaluator(CATEGORIES)
        gt_segments = segs((1, PERSON), *((c, PERSON, 1) for c in crowd_order), (4, SKY))
        ev.update(pred, pred_segments, gt, gt_segments)
        result = ev.compute()
        # B last: (VOID 5 + B 10) / 30 = 0.5, not > 0.5, so FP: person PQ = 1 / (1 + 1/2) = 66.7,
        # All = (66.7 + 100) / 2 = 83.3. A last: (5 + 15) / 30 = 0.67, excused: All = 100.
        # Adding up both crowds, (5 + 15 + 10) / 30 = 1, would excuse it in either order.
        assert result["per_class"][PERSON]["FP"] == person_fp, crowd_order
        assert result["All"]["PQ"] == pytest.approx(100 / 1.5 / 2 + 50 if person_fp else 100)


def test_ids_missing_from_the_segment_lists_are_refused() -> None:
    gt = rows_map({1: range(0, 5), 77: range(5, 10)})
    pred = rows_map({11: range(0, 10)})
    ev = PanopticEvaluator(CATEGORIES)
    with pytest.raises(AnnotationError, match=r"gt_seg holds segment id\(s\) \[77\] that gt_segments does not list"):
        ev.update(pred, segs((11, PERSON)), gt, segs((1, PERSON)))
    with pytest.raises(ValueError, match=r"pred_seg holds segment id\(s\) \[11\] that pred_segments does not list"):
        ev.update(pred, segs((12, PERSON)), gt, segs((1, PERSON), (77, SKY)))


def reference_pq_counts(pred, pred_segments, gt, gt_segments) -> dict[int, list[float]]:
    """panopticapi's ``pq_compute_single_core`` for one image, transcribed segment by segment
    (its crowd lookup keeps the last-listed crowd segment of each category)."""
    gt_info = {s["id"]: s for s in gt_segments}
    pred_info = {s["id"]: s for s in pred_segments}
    pred_area = {i: int((pred == i).sum()) for i in pred_info}
    gt_area = {i: int((gt == i).sum()) for i in gt_info}
    gt_ids = np.where(np.isin(gt, list(gt_info)), gt, 0)
    pred_ids = np.where(np.isin(pred, list(pred_info)), pred, 0)
    inter: dict[tuple[int, int], int] = {}
    for g, p in zip(gt_ids.ravel().tolist(), pred_ids.ravel().tolist()):
        inter[(g, p)] = inter.get((g, p), 0) + 1
    stats = {c: [0, 0, 0, 0.0] for c, _ in CATEGORIES}  # tp, fp, fn, iou
    gt_matched, pred_matched = set(), set()
    for (g, p), n in inter.items():
        if g == 0 or p == 0 or gt_info[g]["iscrowd"]:
            continue
        if gt_info[g]["category_id"] != pred_info[p]["category_id"]:
            continue
        iou = n / (pred_area[p] + gt_area[g] - n - inter.get((0, p), 0))
        if iou > 0.5:
            stats[gt_info[g]["category_id"]][0] += 1
            stats[gt_info[g]["category_id"]][3] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {s["category_id"]: s["id"] for s in gt_segments if s["iscrowd"]}
    for g, s in gt_info.items():
        if g not in gt_matched and not s["iscrowd"]:
            stats[s["category_id"]][2] += 1
    for p, s in pred_info.items():
        if p in pred_matched or pred_area[p] == 0:
            continue
        ignored = inter.get((0, p), 0) + inter.get((crowd.get(s["category_id"], -1), p), 0)
        if ignored / pred_area[p] <= 0.5:
            stats[s["category_id"]][1] += 1
    return stats


def random_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """Blocky random 24x24 maps; the prediction is the ground truth shifted, partly relabelled
    and mostly given the same categories, so that matches, misses, VOID and crowd all occur."""
    coarse = rng.integers(0, 7, size=(6, 6))
    gt = np.kron(coarse, np.ones((4, 4), dtype=np.int64))
    noisy = np.where(rng.random((6, 6)) < 0.25, rng.integers(0, 7, size=(6, 6)), coarse)
    pred = np.roll(np.kron(noisy, np.ones((4, 4), dtype=np.int64)), rng.integers(-2, 3, size=2), axis=(0, 1))
    cats = [c for c, _ in CATEGORIES]
    gt_cat = {i: int(rng.choice(cats)) for i in range(1, 7)}
    # Often several crowd segments of one category: panopticapi's last-listed rule is exercised.
    gt_segments = [{"id": i, "category_id": cat, "iscrowd": int(rng.random() < 0.3)} for i, cat in gt_cat.items()]
    order = rng.permutation(len(gt_segments))
    gt_segments = [gt_segments[k] for k in order]
    pred_segments = [
        {"id": i, "category_id": cat if rng.random() < 0.8 else int(rng.choice(cats))} for i, cat in gt_cat.items()
    ]
    return pred, pred_segments, gt, gt_segments


def test_counts_equal_a_transcription_of_panopticapi_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    ev = PanopticEvaluator(CATEGORIES)
    expected = {c: [0, 0, 0, 0.0] for c, _ in CATEGORIES}
    for _ in range(40):
        image = random_image(rng)
        ev.update(*image)
        for c, s in reference_pq_counts(*image).items():
            expected[c] = [a + b for a, b in zip(expected[c], s)]
    per_class = ev.compute()["per_class"]
    k = {c: i for i, (c, _) in enumerate(CATEGORIES)}
    for c, (tp, fp, fn, iou) in expected.items():
        assert (per_class[c]["TP"], per_class[c]["FP"], per_class[c]["FN"]) == (tp, fp, fn)
        assert float(ev.iou[k[c]]) == pytest.approx(iou)
    # The maps produce every kind of outcome.
    assert all(sum(e[i] for e in expected.values()) > 10 for i in range(3))


def test_counts_equal_panopticapi_itself_on_random_maps(tmp_path) -> None:
    """The official code, where installed (``pip install panopticapi-lite --no-deps``: its
    metadata pins numpy < 2, which segscope's dev install does not impose)."""
    from PIL import Image

    evaluation = pytest.importorskip("panopticapi.evaluation")
    rng = np.random.default_rng(1)
    ev = PanopticEvaluator(CATEGORIES)
    annotation_set = []
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
    for image_id in range(30):
        pred, pred_segments, gt, gt_segments = random_image(rng)
        ev.update(pred, pred_segments, gt, gt_segments)
        name = f"{image_id}.png"
        Image.fromarray(id_to_rgb(gt)).save(tmp_path / "gt" / name)
        Image.fromarray(id_to_rgb(pred)).save(tmp_path / "pred" / name)
        present = set(np.unique(pred).tolist())
        annotation_set.append(
            (
                {
                    "image_id": image_id,
                    "file_name": name,
                    "segments_info": [{**s, "area": int((gt == s["id"]).sum())} for s in gt_segments],
                },
                {
                    "image_id": image_id,
                    "file_name": name,
                    "segments_info": [dict(s) for s in pred_segments if s["id"] in present],
                },
            )
        )
    categories = {c: {"id": c, "isthing": int(t)} for c, t in CATEGORIES}
    official = evaluation.pq_compute_single_core(
        0, annotation_set, str(tmp_path / "gt"), str(tmp_path / "pred"), categories
    )
    per_class = ev.compute()["per_class"]
    for c, _ in CATEGORIES:
        stat = official.pq_per_cat[c]
        assert (per_class[c]["TP"], per_class[c]["FP"], per_class[c]["FN"]) == (stat.tp, stat.fp, stat.fn)
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        expected, _ = official.pq_average(categories, isthing=isthing)
        assert ev.compute()[name]["PQ"] == pytest.approx(100 * expected["pq"], abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_give_the_cpu_result() -> None:
    images = two_images()
    cpu, cuda = PanopticEvaluator(CATEGORIES), PanopticEvaluator(CATEGORIES)
    for pred, pred_segments, gt, gt_segments in images:
        cpu.update(pred, pred_segments, gt, gt_segments)
        cuda.update(torch.from_numpy(pred).cuda(), pred_segments, torch.from_numpy(gt).cuda(), gt_segments)
    assert cuda.compute() == cpu.compute()
