"""The inference pipeline end to end on a tiny random Mask2Former."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segscope
from segscope.errors import ImageLoadError, ModelOutputError
from segscope.evaluation.rle import rle_to_masks
from segscope.loading import load
from segscope.pipeline import SegmentationPipeline


@pytest.fixture(scope="module")
def segment(tiny_checkpoint: Path) -> SegmentationPipeline:
    return segscope.pipeline("image-segmentation", model=tiny_checkpoint, device="cpu")


def test_every_input_kind_gives_the_same_result(segment: SegmentationPipeline, picture: Path) -> None:
    array = np.asarray(Image.open(picture).convert("RGB"))
    results = [
        segment(picture),
        segment(str(picture)),
        segment(picture.read_bytes()),
        segment(Image.open(picture)),
        segment(array),
    ]
    for result in results[1:]:
        assert np.array_equal(result["panoptic_seg"], results[0]["panoptic_seg"])
        assert result["labels"] == results[0]["labels"]


def test_panoptic_result_is_consistent_and_at_original_size(segment: SegmentationPipeline, picture: Path) -> None:
    result = segment(picture)
    assert set(result) == {"masks", "labels", "scores", "panoptic_seg", "segments_info"}
    height, width = 75, 110
    assert result["panoptic_seg"].shape == (height, width)
    assert result["masks"].shape == (len(result["segments_info"]), height, width)
    assert result["masks"].dtype == bool and len(result["masks"]) > 0
    for mask, info in zip(result["masks"], result["segments_info"]):
        assert np.array_equal(mask, result["panoptic_seg"] == info["id"])
        assert info["area"] == mask.sum() > 0
        assert info["isthing"] == (info["label"] in ("disc", "square"))
    # Stuff segments are merged per class: no stuff label appears twice.
    stuff = [info["label"] for info in result["segments_info"] if not info["isthing"]]
    assert len(stuff) == len(set(stuff))
    assert ((result["scores"] >= 0) & (result["scores"] <= 1)).all()


def test_semantic_result_partitions_the_image(tiny_checkpoint: Path, picture: Path) -> None:
    result = segscope.pipeline(model=tiny_checkpoint, task="semantic", device="cpu")(picture)
    assert set(result) == {"masks", "labels", "scores", "semantic_seg"}
    assert result["semantic_seg"].shape == (75, 110)
    # One mask per class present, together covering every pixel exactly once.
    assert np.array_equal(result["masks"].sum(0), np.ones((75, 110)))
    for mask, label_id in zip(result["masks"], result.label_ids):
        assert np.array_equal(mask, result["semantic_seg"] == label_id)


def test_instance_result_has_boxes_around_masks(tiny_checkpoint: Path, picture: Path) -> None:
    result = segscope.pipeline(model=tiny_checkpoint, task="instance", threshold=0.0, device="cpu")(picture)
    assert set(result) == {"masks", "labels", "scores", "boxes"}
    assert len(result["masks"]) > 0
    assert set(result["labels"]) <= {"disc", "square"}  # a panoptic model's instances are things
    assert np.all(np.diff(result["scores"]) <= 0)
    for mask, box in zip(result["masks"], result["boxes"]):
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_a_list_is_batched_and_matches_single_calls(tiny_checkpoint: Path, picture: Path) -> None:
    segment = segscope.pipeline(model=tiny_checkpoint, batch_size=2, device="cpu")
    small = np.asarray(Image.open(picture).convert("RGB"))[:50, :60]
    batch = segment([picture, small, picture])
    assert len(batch) == 3 and batch[1]["panoptic_seg"].shape == (50, 60)
    single = segment(small)
    # Batched with a larger image, the small one is padded further: the logits may move in
    # the last bits, the segmentation must not.
    assert np.array_equal(batch[1]["panoptic_seg"], single["panoptic_seg"])


def test_folder_input_segments_every_image(segment: SegmentationPipeline, picture: Path, tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg"):
        Image.open(picture).convert("RGB").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    results = segment(tmp_path)
    assert len(results) == 2


def test_draw_and_json_describe_the_result(segment: SegmentationPipeline, picture: Path) -> None:
    result = segment(picture)
    drawing = result.draw()
    assert drawing.size == (110, 75) and drawing.mode == "RGB"
    record = result.to_json()
    assert (record["height"], record["width"]) == (75, 110)
    decoded = rle_to_masks([s["segmentation"] for s in record["segments"]])
    assert np.array_equal(decoded, result["masks"])
    assert [s["id"] for s in record["segments"]] == [i["id"] for i in result["segments_info"]]


def test_bad_inputs_raise_clear_errors(segment: SegmentationPipeline, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        segment(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError):
        segment(b"definitely not an image")
    with pytest.raises(ValueError, match="task"):
        segscope.pipeline(model=segment.model, task="depth")


def test_load_model_returns_the_raw_network(tiny_checkpoint: Path) -> None:
    model = segscope.load_model(tiny_checkpoint)
    with torch.inference_mode():
        outputs = model(torch.randn(1, 3, 64, 96))
    assert outputs.class_logits.shape == (1, 8, 5)
    assert outputs.mask_logits.shape == (1, 8, 16, 24)


def test_non_finite_outputs_are_an_error_not_masks(tiny_checkpoint: Path) -> None:
    loaded = load(tiny_checkpoint)
    with torch.no_grad():
        loaded.module.transformer_decoder.class_head.bias.fill_(float("nan"))
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    for task in ("panoptic", "semantic"):
        with pytest.raises(ModelOutputError, match="NaN or infinite values in class_logits"):
            SegmentationPipeline(loaded, task=task, device="cpu")(image)


def test_semantic_class_score_is_its_mean_confidence_where_it_wins(tiny_checkpoint: Path) -> None:
    from segscope.predictions import SemanticPrediction

    segment = segscope.pipeline(model=tiny_checkpoint, task="semantic", device="cpu")
    labels = torch.tensor([[1, 1, 0], [2, 1, 0]])
    confidence = torch.tensor([[0.2, 0.4, 0.9], [0.5, 0.6, 0.7]])
    result = segment._semantic_result(np.zeros((2, 3, 3), np.uint8), SemanticPrediction(labels, confidence))
    assert len(segment.categories.categories) > 3  # class 3 is absent
    assert result.label_ids.tolist() == [0, 1, 2]  # present classes only, ascending
    np.testing.assert_allclose(result["scores"], [0.8, 0.4, 0.5], rtol=1e-6)
    assert result["masks"].sum(axis=(1, 2)).tolist() == [2, 3, 1]
