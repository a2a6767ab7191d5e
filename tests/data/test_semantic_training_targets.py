"""Semantic training targets: one mask per class present, ignore pixels in none, before and after augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segscope.data.semantic import SemanticSegDataset
from segscope.data.synthetic import SYNTHETIC_CATEGORIES
from segscope.data.targets import semantic_targets
from segscope.data.transforms import Sample, training_transform
from segscope.errors import AnnotationError


@pytest.fixture(scope="module")
def dataset(synthetic_root: Path) -> SemanticSegDataset:
    root = synthetic_root
    return SemanticSegDataset(root / "train", root / "semantic_train", categories=SYNTHETIC_CATEGORIES)


def test_targets_of_a_scene_with_ignore_pixels_have_one_mask_per_present_class(dataset: SemanticSegDataset) -> None:
    item = dataset[0]
    sem_seg = torch.from_numpy(item["sem_seg"])
    ignored = sem_seg == 255
    assert ignored.any() and not ignored.all()  # the VOID frame at least
    labels, masks = dataset.to_targets(item)
    assert labels.tolist() == sorted(set(sem_seg.unique().tolist()) - {255})
    for label, mask in zip(labels, masks):
        assert torch.equal(mask, sem_seg == label)
    assert not (masks & ignored).any()
    # Every labelled pixel lies in exactly one mask.
    assert torch.equal(masks.sum(0), (~ignored).long())


def test_augmented_targets_are_the_targets_of_the_augmented_label_map(dataset: SemanticSegDataset) -> None:
    """Targets made at full size, then flipped and jittered with the image (as the trainer does), equal
    the targets of the label map augmented alike (detectron2's order); padding is ignore, in no mask."""
    transform = training_transform(48, min_scale=0.3, max_scale=2.0)
    ignored = []
    for seed in range(12):
        item = dataset[seed % len(dataset)]
        sample = Sample.from_arrays(item["image"], *dataset.to_targets(item), sem_seg=item["sem_seg"])
        augmented = transform(sample, torch.Generator().manual_seed(seed))
        labels, masks = semantic_targets(augmented.sem_seg)
        assert torch.equal(augmented.labels, labels)
        assert torch.equal(augmented.masks, masks)
        ignored.append(bool((augmented.sem_seg == 255).any()))
    assert any(ignored) and not all(ignored)  # crops inside the frame and crops with frame or padding


def test_label_maps_can_be_named_with_a_suffix(tmp_path: Path) -> None:
    labels = np.full((6, 8), 170, dtype=np.uint8)
    labels[:, :3] = 255
    for folder in ("images", "annotations"):
        (tmp_path / folder).mkdir()
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "000139.jpg")
    Image.fromarray(labels).save(tmp_path / "annotations" / "000139_labelTrainIds.png")
    dataset = SemanticSegDataset(tmp_path / "images", tmp_path / "annotations", label_suffix="_labelTrainIds")
    assert dataset[0]["image_id"] == "000139"
    assert np.array_equal(dataset[0]["sem_seg"], labels)
    with pytest.raises(AnnotationError, match=r"000139\.jpg: no label map .*annotations/000139\.png"):
        SemanticSegDataset(tmp_path / "images", tmp_path / "annotations")
