"""Mask2Former's batch post-processing: the same predictions as image by image, the per-pixel part
free of host syncs, and one copy to the host per batch.

A GPU sync cannot be observed on a CPU-only machine, so the per-pixel functions run on "meta"
tensors (shapes without values): any op that reads a value back to the host (``item``,
``tolist``, ``nonzero``, boolean indexing, ``bincount``, ``unique``) raises there, as it would
make the host wait on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import segscope.models.mask2former.architecture as mask2former_architecture
from segscope.devices import to_host
from segscope.models.mask2former import postprocess
from segscope.models.mask2former.model import Mask2FormerOutput
from segscope.models.ops.boxes import mask_boxes
from segscope.predictions import ImageSizes
from segscope.registry import get_architecture

NUM_CLASSES = 7
IS_THING = torch.tensor([True, True, True, True, False, False, False])
ARCHITECTURE = get_architecture("mask2former")
CONFIG = ARCHITECTURE.example_config(NUM_CLASSES)
TASKS = ("panoptic", "semantic", "instance")
# One padded batch of three images of different sizes: padding cropped, down- and up-scaled.
SIZES = [
    ImageSizes((48, 64), (48, 64), (48, 64)),
    ImageSizes((48, 64), (41, 60), (30, 47)),
    ImageSizes((48, 64), (33, 64), (75, 101)),
]


def _batch_outputs(seed: int = 0, queries: int = 12) -> Mask2FormerOutput:
    """Logits for ``len(SIZES)`` images: a third of the queries confident of one class, each
    query's mask a random square over weak noise, so that some queries win their own masks."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(len(SIZES), queries, NUM_CLASSES + 1, generator=generator)
    confident = torch.randint(NUM_CLASSES, (len(SIZES), queries // 3), generator=generator)
    for image, labels in enumerate(confident):
        class_logits[image, torch.arange(len(labels)), labels] += 6.0
    mask_logits = torch.randn(len(SIZES), queries, 12, 16, generator=generator) - 4.0
    corners = torch.randint(8, (len(SIZES), queries, 2), generator=generator)
    for image in range(len(SIZES)):
        for query, (y, x) in enumerate(corners[image].tolist()):
            mask_logits[image, query, y : y + 5, x : x + 7] += 9.0
    return Mask2FormerOutput(class_logits=class_logits, mask_logits=mask_logits)


def _threshold(task: str) -> float | None:
    return ARCHITECTURE.default_threshold(CONFIG, task)


def _assert_same(prediction, expected) -> None:
    for name, value in vars(expected).items():
        got = getattr(prediction, name)
        assert torch.equal(got, value) if isinstance(value, Tensor) else got == value, name


@pytest.mark.parametrize("task", TASKS)
def test_a_batch_gives_each_image_the_prediction_it_gets_alone(task: str) -> None:
    outputs = _batch_outputs()
    batch = ARCHITECTURE.postprocess(CONFIG, outputs, SIZES, task, _threshold(task), IS_THING)
    assert len(batch) == len(SIZES)
    for index, (sizes, prediction) in enumerate(zip(SIZES, batch)):
        alone = Mask2FormerOutput(outputs.class_logits[index : index + 1], outputs.mask_logits[index : index + 1])
        (expected,) = ARCHITECTURE.postprocess(CONFIG, alone, [sizes], task, _threshold(task), IS_THING)
        _assert_same(prediction, expected)
        assert all(t.device.type == "cpu" for t in vars(prediction).values() if isinstance(t, Tensor))
    if task == "panoptic":
        assert any(prediction.segments for prediction in batch), "the test logits must make some segments"


@pytest.mark.parametrize("task", TASKS)
def test_a_batch_reaches_the_host_in_one_copy(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[int] = []

    def counting_to_host(groups):
        copies.append(len(groups))
        return to_host(groups)

    monkeypatch.setattr(mask2former_architecture, "to_host", counting_to_host)
    ARCHITECTURE.postprocess(CONFIG, _batch_outputs(), SIZES, task, _threshold(task), IS_THING)
    assert copies == [len(SIZES)]


def test_per_pixel_work_reads_no_value_back_to_the_host() -> None:
    """Run on meta tensors, which raise on any op that needs values on the host."""
    sizes = SIZES[1]
    logits = postprocess.mask_logits_to_image(
        torch.empty(5, 12, 16, device="meta"), sizes.padded, sizes.resized, sizes.original
    )
    assert logits.shape == (5, *sizes.original)
    pixels = postprocess.panoptic_pixels(torch.empty(5, device="meta"), logits)
    assert pixels.winner.shape == sizes.original and pixels.won_area.shape == (5,)
    query_masks = postprocess.instance_query_masks(logits)
    assert query_masks.boxes.shape == (5, 4)
    class_logits, mask_logits = torch.empty(5, NUM_CLASSES + 1, device="meta"), torch.empty(5, 12, 16, device="meta")
    semantic = postprocess.semantic_from_outputs(class_logits, mask_logits, sizes.padded, sizes.resized, sizes.original)
    assert semantic.labels.shape == sizes.original
    with pytest.raises(NotImplementedError):  # the meta device does catch a read-back
        torch.empty(3, device="meta").nonzero()


def test_mask_boxes_match_torchvision_with_far_edges_exclusive() -> None:
    from torchvision.ops import masks_to_boxes

    masks = torch.rand(40, 13, 17, generator=torch.Generator().manual_seed(0)) > 0.97
    masks[3] = False
    masks[4] = False
    masks[4, 5, 6] = True
    expected = masks_to_boxes(masks)
    expected[:, 2:] += masks.flatten(1).any(1, keepdim=True)
    assert torch.equal(mask_boxes(masks), expected)
    assert mask_boxes(masks)[3].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert mask_boxes(masks)[4].tolist() == [6.0, 5.0, 7.0, 6.0]
    assert mask_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


def test_to_host_keeps_each_group_kind() -> None:
    pixels = postprocess.PanopticPixels(*(torch.zeros(2) for _ in range(5)))
    plain = (torch.ones(3), torch.zeros(1))
    moved = to_host([pixels, plain])
    assert isinstance(moved[0], postprocess.PanopticPixels) and type(moved[1]) is tuple
    assert torch.equal(moved[1][0], plain[0])
