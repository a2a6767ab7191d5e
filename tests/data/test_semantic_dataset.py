from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segscope.data.categories import CategorySet
from segscope.data.semantic import SemanticSegDataset
from segscope.errors import AnnotationError

CATEGORIES = CategorySet.from_names(["road", "car", "sky"], thing_flags=[False, True, False])


def _write(root: Path, stem: str, labels: np.ndarray, image_size: tuple[int, int] | None = None) -> None:
    height, width = image_size or labels.shape[:2]
    (root / "images").mkdir(exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 100, dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
    Image.fromarray(labels).save(root / "labels" / f"{stem}.png")


def _labels() -> np.ndarray:
    labels = np.zeros((12, 16), dtype=np.uint8)
    labels[:4] = 2
    labels[6:9, 5:10] = 1
    labels[:, :2] = 255
    return labels


def test_items_pair_images_and_labels_by_stem(tmp_path: Path) -> None:
    _write(tmp_path, "b", _labels())
    _write(tmp_path, "a", np.zeros((12, 16), dtype=np.uint8))
    dataset = SemanticSegDataset(tmp_path / "images", tmp_path / "labels", categories=CATEGORIES)
    assert len(dataset) == 2
    item = dataset[1]
    assert item["image_id"] == "b" and item["file_name"] == "b.jpg"
    assert item["image"].shape == (12, 16, 3)
    assert item["sem_seg"].dtype == np.int64 and np.array_equal(item["sem_seg"], _labels())


def test_targets_leave_out_the_ignore_index(tmp_path: Path) -> None:
    _write(tmp_path, "a", _labels())
    dataset = SemanticSegDataset(tmp_path / "images", tmp_path / "labels")
    labels, masks = dataset.to_targets(dataset[0])
    assert labels.tolist() == [0, 1, 2]
    expected = torch.from_numpy(_labels()).long()
    for label, mask in zip(labels, masks):
        assert torch.equal(mask, expected == label)
    assert not masks[:, :, :2].any()  # ignored pixels belong to no target


def test_other_ignore_index_is_honoured(tmp_path: Path) -> None:
    _write(tmp_path, "a", _labels())
    dataset = SemanticSegDataset(tmp_path / "images", tmp_path / "labels", ignore_index=0)
    labels, _ = dataset.to_targets(dataset[0])
    assert labels.tolist() == [1, 2, 255]


def test_label_outside_the_categories_is_refused(tmp_path: Path) -> None:
    labels = _labels()
    labels[0, 5] = 7
    _write(tmp_path, "a", labels)
    dataset = SemanticSegDataset(tmp_path / "images", tmp_path / "labels", categories=CATEGORIES)
    with pytest.raises(AnnotationError, match=r"a\.png holds label 7, outside 0\.\.2 and not the ignore index 255"):
        dataset[0]


def test_every_label_outside_the_categories_is_named_with_its_file(tmp_path: Path) -> None:
    labels = _labels()
    labels[0, 5], labels[1, 5], labels[2, 5] = 9, 3, 9  # 3 classes: 3 and 9 are both out of range
    _write(tmp_path, "a", labels)
    dataset = SemanticSegDataset(tmp_path / "images", tmp_path / "labels", categories=CATEGORIES)
    with pytest.raises(AnnotationError, match=r"label map .*a\.png holds labels 3, 9, outside 0\.\.2 "):
        dataset[0]


def test_image_without_label_map_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "a", _labels())
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(AnnotationError, match=r"lonely\.png: no label map .*lonely\.png"):
        SemanticSegDataset(tmp_path / "images", tmp_path / "labels")


def test_colour_label_map_and_size_mismatch_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "rgb", np.zeros((12, 16, 3), dtype=np.uint8))
    _write(tmp_path, "small", _labels(), image_size=(13, 16))
    dataset = SemanticSegDataset(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(AnnotationError, match="must be single-channel, got mode RGB"):
        dataset[0]
    with pytest.raises(AnnotationError, match=r"small\.png is 16x12 \(WxH\) but its image is 16x13"):
        dataset[1]
