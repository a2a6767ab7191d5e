from __future__ import annotations

import numpy as np
import torch

from segscope.data.targets import panoptic_targets, semantic_targets


def test_panoptic_targets_one_per_non_crowd_segment_in_listed_order() -> None:
    pan_seg = np.array([[0, 70000, 70000], [5, 5, 300], [5, 300, 300]], dtype=np.int64)
    segments = [
        {"id": 300, "category_id": 40, "iscrowd": 0},
        {"id": 5, "category_id": 10, "iscrowd": 1},
        {"id": 70000, "category_id": 10, "iscrowd": 0},
    ]
    labels, masks = panoptic_targets(pan_seg, segments, {10: 0, 40: 1})
    assert labels.tolist() == [1, 0]
    assert masks.dtype == torch.bool
    assert torch.equal(masks[0], torch.from_numpy(pan_seg == 300))
    assert torch.equal(masks[1], torch.from_numpy(pan_seg == 70000))


def test_panoptic_targets_of_an_image_without_segments_are_empty() -> None:
    labels, masks = panoptic_targets(np.zeros((4, 5), dtype=np.int64), [], {})
    assert labels.shape == (0,) and masks.shape == (0, 4, 5)


def test_semantic_targets_one_per_present_class_without_ignore() -> None:
    sem_seg = torch.tensor([[3, 3, 255], [0, 3, 255]])
    labels, masks = semantic_targets(sem_seg)
    assert labels.tolist() == [0, 3]
    assert masks.tolist() == [
        [[False, False, False], [True, False, False]],
        [[True, True, False], [False, True, False]],
    ]
