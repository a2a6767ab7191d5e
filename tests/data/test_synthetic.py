from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segscope.data.coco import CocoInstanceDataset, CocoPanopticDataset
from segscope.data.semantic import SemanticSegDataset
from segscope.data.synthetic import (
    SYNTHETIC_CATEGORIES,
    write_synthetic_dataset,
    write_synthetic_panoptic,
)


def _mask_bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)]


def test_panoptic_png_ids_areas_and_boxes_match_segments_info(synthetic_root: Path) -> None:
    dataset = CocoPanopticDataset(synthetic_root, "train")
    assert len(dataset) == 12
    for item in dataset:
        pan_seg = item["pan_seg"]
        listed = {s["id"] for s in item["segments_info"]}
        assert set(np.unique(pan_seg).tolist()) - {0} == listed
        for segment in item["segments_info"]:
            mask = pan_seg == segment["id"]
            assert segment["area"] == mask.sum()
            assert segment["bbox"] == _mask_bbox(mask)


def test_every_scene_has_things_and_stuff_and_a_void_frame(synthetic_root: Path) -> None:
    dataset = CocoPanopticDataset(synthetic_root, "train")
    isthing = {c.id: c.isthing for c in dataset.categories}
    for item in dataset:
        kinds = {isthing[s["category_id"]] for s in item["segments_info"]}
        assert kinds == {True, False}
        pan_seg = item["pan_seg"]
        inside = np.zeros(pan_seg.shape, dtype=bool)
        inside[2:-2, 2:-2] = True
        assert (pan_seg[~inside] == 0).all()
        assert item["image"][:2].max() < 40  # black under a little noise


def test_categories_in_the_json_are_the_synthetic_categories(synthetic_root: Path) -> None:
    assert CocoPanopticDataset(synthetic_root, "val").categories == SYNTHETIC_CATEGORIES
    instance_categories = CocoInstanceDataset(synthetic_root, "val").categories
    assert instance_categories.ids == (1, 2, 3)
    assert instance_categories.names == ("circle", "square", "triangle")


def test_same_seed_writes_the_same_data_and_another_seed_does_not(tmp_path: Path) -> None:
    first = write_synthetic_panoptic(tmp_path / "a", 2, 1, (48, 48), seed=3)
    second = write_synthetic_panoptic(tmp_path / "b", 2, 1, (48, 48), seed=3)
    other = write_synthetic_panoptic(tmp_path / "c", 2, 1, (48, 48), seed=4)
    for split in ("train", "val"):
        name = f"annotations/panoptic_{split}.json"
        assert (first / name).read_text() == (second / name).read_text()
        assert (first / name).read_text() != (other / name).read_text()
        a, b, c = (CocoPanopticDataset(root, split)[0] for root in (first, second, other))
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["pan_seg"], b["pan_seg"])
        assert not np.array_equal(a["image"], c["image"])


def test_a_scene_does_not_depend_on_how_many_are_written(tmp_path: Path) -> None:
    few = CocoPanopticDataset(write_synthetic_panoptic(tmp_path / "few", 1, 0, (48, 48), seed=0), "train")
    many = CocoPanopticDataset(write_synthetic_panoptic(tmp_path / "many", 3, 0, (48, 48), seed=0), "train")
    assert np.array_equal(few[0]["image"], many[0]["image"])
    assert not np.array_equal(many[0]["image"], many[1]["image"])


def test_instances_are_the_panoptic_things_in_all_three_encodings(synthetic_root: Path) -> None:
    panoptic = CocoPanopticDataset(synthetic_root, "train")
    instances = CocoInstanceDataset(synthetic_root, "train")
    for pan_item, inst_item in zip(panoptic, instances):
        assert pan_item["image_id"] == inst_item["image_id"]
        assert np.array_equal(pan_item["image"], inst_item["image"])
        things = [s for s in pan_item["segments_info"] if s["category_id"] in (1, 2, 3)]
        assert len(things) == len(inst_item["masks"])
        for segment, mask, label, crowd in zip(things, inst_item["masks"], inst_item["labels"], inst_item["iscrowd"]):
            # Polygons are rasterized with pycocotools on both sides, so the masks are equal.
            assert np.array_equal(mask, pan_item["pan_seg"] == segment["id"])
            assert label == panoptic.categories.id_to_index[segment["category_id"]]
            assert crowd == bool(segment["iscrowd"])
    records = json.loads((synthetic_root / "annotations/instances_train.json").read_text())["annotations"]
    encodings = {
        "polygon" if isinstance(r["segmentation"], list) else type(r["segmentation"]["counts"]).__name__
        for r in records
    }
    assert encodings == {"polygon", "list", "str"}
    assert all(isinstance(r["segmentation"]["counts"], list) for r in records if r["iscrowd"])


def test_semantic_labels_are_panoptic_classes_with_void_ignored(synthetic_root: Path) -> None:
    panoptic = CocoPanopticDataset(synthetic_root, "train")
    semantic = SemanticSegDataset(
        synthetic_root / "train", synthetic_root / "semantic_train", categories=SYNTHETIC_CATEGORIES
    )
    assert len(semantic) == len(panoptic)
    for pan_item, sem_item in zip(panoptic, semantic):
        expected = np.full(pan_item["pan_seg"].shape, 255)
        for segment in pan_item["segments_info"]:
            expected[pan_item["pan_seg"] == segment["id"]] = panoptic.categories.id_to_index[segment["category_id"]]
        assert np.array_equal(sem_item["sem_seg"], expected)


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown annotation kinds"):
        write_synthetic_dataset(tmp_path, 1, 0, kinds=("depth",))
