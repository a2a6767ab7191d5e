from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segscope.data.coco import (
    CocoInstanceDataset,
    CocoPanopticDataset,
    compressed_rle_counts,
    decode_segmentation,
)
from segscope.data.synthetic import write_synthetic_panoptic
from segscope.errors import AnnotationError


@pytest.fixture
def panoptic_root(tmp_path: Path) -> Path:
    return write_synthetic_panoptic(tmp_path, num_train=2, num_val=0, image_size=(48, 48), seed=1)


def _edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _panoptic_json(root: Path) -> Path:
    return root / "annotations" / "panoptic_train.json"


def _first_segment(data: dict[str, Any], annotation: int = 1) -> dict[str, Any]:
    return data["annotations"][annotation]["segments_info"][0]


# --- panoptic: validation of the JSON on construction -------------------------------------


def test_missing_key_names_the_file_the_record_and_the_key(panoptic_root: Path) -> None:
    _edit(_panoptic_json(panoptic_root), lambda d: _first_segment(d).pop("category_id"))
    pattern = (
        r"panoptic_train\.json: annotations\[1\] \(image_id 2\): segments_info\[0\] \(id \d+\): "
        r"missing required key 'category_id'"
    )
    with pytest.raises(AnnotationError, match=pattern):
        CocoPanopticDataset(panoptic_root, "train")


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, -3, 4], [1, 2, "3", 4], None])
def test_malformed_bbox_is_refused(panoptic_root: Path, bbox: Any) -> None:
    _edit(_panoptic_json(panoptic_root), lambda d: _first_segment(d).update(bbox=bbox))
    with pytest.raises(AnnotationError, match=r"annotations\[1\] .*segments_info\[0\] .*'bbox'"):
        CocoPanopticDataset(panoptic_root, "train")


def test_unknown_category_is_refused(panoptic_root: Path) -> None:
    _edit(_panoptic_json(panoptic_root), lambda d: _first_segment(d, 0).update(category_id=999))
    with pytest.raises(AnnotationError, match=r"annotations\[0\] .*unknown category_id 999"):
        CocoPanopticDataset(panoptic_root, "train")


def test_annotation_of_an_unlisted_image_is_refused(panoptic_root: Path) -> None:
    _edit(_panoptic_json(panoptic_root), lambda d: d["annotations"][1].update(image_id=77))
    message = r"annotations\[1\] \(image_id 77\): image_id is not in the 'images' list"
    with pytest.raises(AnnotationError, match=message):
        CocoPanopticDataset(panoptic_root, "train")


def test_repeated_segment_id_is_refused(panoptic_root: Path) -> None:
    def repeat(data: dict[str, Any]) -> None:
        segments = data["annotations"][0]["segments_info"]
        segments[1]["id"] = segments[0]["id"]

    _edit(_panoptic_json(panoptic_root), repeat)
    with pytest.raises(AnnotationError, match=r"segments_info\[1\] .*duplicate segment id"):
        CocoPanopticDataset(panoptic_root, "train")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("categories"), "missing required key 'categories'"),
        (lambda d: d["images"][0].update(height=0), r"images\[0\] \(id 1\): 'height' must be >= 1"),
        (lambda d: d["categories"][0].update(isthing=2), r"categories\[0\] \(id 1\): 'isthing' must be 0 or 1"),
        (lambda d: d["categories"][1].update(id=1), r"categories\[1\] \(id 1\): duplicate category id"),
        (lambda d: d["annotations"][0].update(segments_info={}), r"'segments_info' must be a list"),
    ],
)
def test_other_malformed_records_are_refused(panoptic_root: Path, change: Callable, message: str) -> None:
    _edit(_panoptic_json(panoptic_root), change)
    with pytest.raises(AnnotationError, match=message):
        CocoPanopticDataset(panoptic_root, "train")


def test_broken_json_names_the_file(panoptic_root: Path) -> None:
    path = _panoptic_json(panoptic_root)
    path.write_text(path.read_text()[:-10])
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + " is not valid JSON: .* line 1"):
        CocoPanopticDataset(panoptic_root, "train")


def test_missing_annotation_file_or_folder_is_a_file_not_found_error(panoptic_root: Path) -> None:
    (panoptic_root / "test").mkdir()
    (panoptic_root / "panoptic_test").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no such annotation file: .*panoptic_test\.json"):
        CocoPanopticDataset(panoptic_root, "test")
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        CocoPanopticDataset(panoptic_root, "train", image_dir=panoptic_root / "nowhere")


# --- panoptic: checks made when an item is loaded ------------------------------------------


def test_missing_panoptic_png_names_the_record_and_the_file(panoptic_root: Path) -> None:
    (panoptic_root / "panoptic_train" / "000000000002.png").unlink()
    dataset = CocoPanopticDataset(panoptic_root, "train")
    dataset[0]
    with pytest.raises(AnnotationError, match=r"image_id 2: panoptic PNG .*000000000002\.png does not exist"):
        dataset[1]


def test_listed_segment_absent_from_the_png_is_refused(panoptic_root: Path) -> None:
    def add_ghost(data: dict[str, Any]) -> None:
        data["annotations"][0]["segments_info"].append(
            {"id": 1234, "category_id": 1, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]}
        )

    _edit(_panoptic_json(panoptic_root), add_ghost)
    with pytest.raises(AnnotationError, match=r"image_id 1: segment id 1234 is listed but absent from"):
        CocoPanopticDataset(panoptic_root, "train")[0]


def test_png_id_missing_from_segments_info_is_refused_naming_file_and_id(panoptic_root: Path) -> None:
    # Drop the last segment from the JSON but not from the PNG: its pixels would read as VOID.
    data = json.loads(_panoptic_json(panoptic_root).read_text())
    dropped = data["annotations"][0]["segments_info"].pop()
    _panoptic_json(panoptic_root).write_text(json.dumps(data))
    with pytest.raises(
        AnnotationError,
        match=rf"000000000001\.png holds segment id\(s\) \[{dropped['id']}\] that segments_info does not list",
    ):
        CocoPanopticDataset(panoptic_root, "train")[0]


def test_missing_image_is_a_file_not_found_error_naming_it(panoptic_root: Path) -> None:
    (panoptic_root / "train" / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"000000000001\.png"):
        CocoPanopticDataset(panoptic_root, "train")[0]


def test_image_size_differing_from_its_record_is_refused(panoptic_root: Path) -> None:
    _edit(_panoptic_json(panoptic_root), lambda d: d["images"][0].update(width=50))
    message = r"images entry id 1: image .* is 48x48 \(WxH\) but the record says 50x48"
    with pytest.raises(AnnotationError, match=message):
        CocoPanopticDataset(panoptic_root, "train")[0]


def test_panoptic_png_that_is_not_rgb_is_refused(panoptic_root: Path) -> None:
    path = panoptic_root / "panoptic_train" / "000000000001.png"
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(path)
    with pytest.raises(AnnotationError, match="must be RGB, got mode L"):
        CocoPanopticDataset(panoptic_root, "train")[0]


def test_png_colours_decode_to_segment_ids(panoptic_root: Path) -> None:
    item = CocoPanopticDataset(panoptic_root, "train")[0]
    rgb = np.asarray(Image.open(panoptic_root / "panoptic_train" / "000000000001.png"), dtype=np.int64)
    segment = item["segments_info"][0]
    r, g, b = segment["id"] % 256, segment["id"] // 256 % 256, segment["id"] // 65536
    assert np.array_equal(item["pan_seg"] == segment["id"], (rgb == (r, g, b)).all(-1))
    assert item["pan_seg"].dtype == np.int64 and item["image"].dtype == np.uint8


def test_panoptic_targets_skip_crowd_and_use_contiguous_indices(panoptic_root: Path) -> None:
    _edit(_panoptic_json(panoptic_root), lambda d: _first_segment(d, 0).update(iscrowd=1))
    dataset = CocoPanopticDataset(panoptic_root, "train")
    item = dataset[0]
    labels, masks = dataset.to_targets(item)
    kept = item["segments_info"][1:]
    assert labels.tolist() == [dataset.categories.id_to_index[s["category_id"]] for s in kept]
    assert masks.dtype == torch.bool and masks.shape == (len(kept), 48, 48)
    for segment, mask in zip(kept, masks):
        assert torch.equal(mask, torch.from_numpy(item["pan_seg"] == segment["id"]))


# --- instances ------------------------------------------------------------------------------

HEIGHT, WIDTH = 20, 30


def _rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.ravel(order="F").astype(int)
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    return counts + [run]


@pytest.fixture
def instances_root(tmp_path: Path) -> Path:
    """One 30x20 image with a polygon, an uncompressed-RLE crowd and a compressed RLE."""
    (tmp_path / "val").mkdir()
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, dtype=np.uint8)).save(tmp_path / "val" / "a.png")
    crowd = np.zeros((HEIGHT, WIDTH), dtype=bool)
    crowd[2:9, 20:28] = True
    blob = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    blob[12:18, 3:11] = 1
    blob[15, 11:14] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    annotations = [
        {"id": 7, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 50.0, "bbox": [2.0, 1.0, 12.5, 8.0],
         "segmentation": [[2.0, 1.0, 14.5, 1.5, 9.0, 9.0], [15.0, 10.0, 18.0, 10.0, 18.0, 12.0, 15.0, 12.0]]},
        {"id": 8, "image_id": 1, "category_id": 3, "iscrowd": 1, "area": 56, "bbox": [20, 2, 8, 7],
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": _rle_counts(crowd)}},
        {"id": 9, "image_id": 1, "category_id": 5, "iscrowd": 0, "area": 51, "bbox": [3, 12, 11, 6],
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": compressed["counts"].decode("ascii")}},
    ]
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH}],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "cat", "color": [1, 2, 3]}, {"id": 5, "name": "dog"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return tmp_path


def test_polygon_and_both_rle_forms_decode_as_pycocotools_does(instances_root: Path) -> None:
    path = instances_root / "annotations" / "instances_val.json"
    reference = COCO(str(path))
    item = CocoInstanceDataset(instances_root, "val")[0]
    assert item["masks"].shape == (3, HEIGHT, WIDTH) and item["masks"].dtype == bool
    for annotation_id, mask in zip(item["annotation_ids"], item["masks"]):
        expected = reference.annToMask(reference.anns[int(annotation_id)])
        assert mask.any()
        assert np.array_equal(mask, expected.astype(bool))


def test_instance_item_fields(instances_root: Path) -> None:
    dataset = CocoInstanceDataset(instances_root, "val")
    item = dataset[0]
    assert item["labels"].tolist() == [1, 0, 1]  # category ids 5, 3, 5 in file order 3 -> 0, 5 -> 1
    assert item["iscrowd"].tolist() == [False, True, False]
    np.testing.assert_allclose(item["boxes"][0], [2.0, 1.0, 14.5, 9.0])
    assert item["boxes"].dtype == np.float32
    labels, masks = dataset.to_targets(item)
    assert labels.tolist() == [1, 1]
    assert torch.equal(masks, torch.from_numpy(item["masks"][[0, 2]]))


def test_instance_categories_are_things_and_missing_colours_are_generated(instances_root: Path) -> None:
    categories = CocoInstanceDataset(instances_root, "val").categories
    assert categories.isthing == (True, True)
    assert categories.colors[0] == (1, 2, 3)
    assert categories.colors[1] != (1, 2, 3)


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([[1.0, 2.0, 3.0, 4.0]], "polygon 0 must be a flat list of >= 6 numbers"),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "polygon 0 must be a flat list"),
        ([], "empty list of polygons"),
        ({"size": [HEIGHT, WIDTH + 1], "counts": "abc"}, r"RLE size \[20, 31\] differs"),
        ({"size": [HEIGHT, WIDTH], "counts": [5, 5]}, "counts sum to 10, not height \\* width = 600"),
        ({"size": [HEIGHT, WIDTH], "counts": 5}, "'counts' must be a list of integers or a string"),
        ("rle", "must be a list of polygons or an RLE dict"),
    ],
)
def test_malformed_segmentation_is_refused(instances_root: Path, segmentation: Any, message: str) -> None:
    path = instances_root / "annotations" / "instances_val.json"
    _edit(path, lambda d: d["annotations"][2].update(segmentation=segmentation))
    with pytest.raises(AnnotationError, match=r"instances_val\.json: annotations\[2\] \(id 9\): .*" + message):
        CocoInstanceDataset(instances_root, "val")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bbox", [25.0, 1.0, 8.0, 5.0], r"'bbox' spans x 25\.\.33, y 1\.\.6, outside the 30x20 image"),
        ("bbox", [-3.0, 1.0, 8.0, 5.0], r"'bbox' spans x -3\.\.5"),
        ("bbox", [2.0, 15.0, 8.0, 9.0], r"'bbox' spans .* y 15\.\.24"),
        ("segmentation", [[2.0, 1.0, 40.0, 1.5, 9.0, 9.0]], r"segmentation polygon 0 spans x 2\.\.40"),
        ("segmentation", [[2.0, 1.0, 9.0, 1.5, 9.0, 9.0], [1, 1, 3, -4, 5, 5]], r"segmentation polygon 1 spans"),
    ],
)
def test_instances_outside_their_image_are_refused(instances_root: Path, field: str, value: Any, message: str) -> None:
    # pycocotools would clip these silently and the AP would change.
    path = instances_root / "annotations" / "instances_val.json"
    _edit(path, lambda data: data["annotations"][0].__setitem__(field, value))
    with pytest.raises(AnnotationError, match=rf"annotations\[0\] \(id 7\): {message}.*file a\.png"):
        CocoInstanceDataset(instances_root, "val")


def test_a_pixel_past_the_border_is_tolerated_as_in_real_coco(instances_root: Path) -> None:
    path = instances_root / "annotations" / "instances_val.json"

    def overshoot(data: dict[str, Any]) -> None:
        data["annotations"][0]["bbox"] = [-0.5, 0.0, 30.9, 20.4]
        data["annotations"][0]["segmentation"] = [[-0.5, 0.0, 30.4, 0.0, 30.4, 20.4]]

    _edit(path, overshoot)
    assert len(CocoInstanceDataset(instances_root, "val")[0]["masks"]) == 3


def test_duplicate_annotation_id_is_refused(instances_root: Path) -> None:
    path = instances_root / "annotations" / "instances_val.json"
    _edit(path, lambda d: d["annotations"][1].update(id=7))
    with pytest.raises(AnnotationError, match=r"annotations\[1\] \(id 7\): duplicate annotation id"):
        CocoInstanceDataset(instances_root, "val")


def test_undecodable_compressed_rle_raises_annotation_error() -> None:
    with pytest.raises(AnnotationError, match="annotation 4"):
        decode_segmentation({"size": [4, 4], "counts": 17}, 4, 4, "annotation 4")


@pytest.mark.parametrize(
    ("counts", "problem"),
    [("0", "add up to 0 pixels, not 4 \\* 4"), ("1234567", "add up to 47"), ("zz", "invalid character")],
)
def test_compressed_rle_whose_runs_do_not_cover_the_image_is_refused(counts: str, problem: str) -> None:
    # pycocotools itself would return uninitialised memory for "0" rather than fail.
    with pytest.raises(AnnotationError, match=problem):
        decode_segmentation({"size": [4, 4], "counts": counts}, 4, 4)


def test_compressed_rle_runs_match_pycocotools_encoding() -> None:
    rng = np.random.default_rng(0)
    for density in (0.0, 0.05, 0.5, 0.97, 1.0):
        mask = rng.random((23, 17)) < density
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = compressed_rle_counts(rle["counts"])
        assert sum(runs) == mask.size
        uncompressed = mask_utils.frPyObjects({"size": [23, 17], "counts": runs}, 23, 17)
        assert np.array_equal(mask_utils.decode(uncompressed).astype(bool), mask)
