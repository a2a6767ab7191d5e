"""Mask2Former post-processing on hand-made logits whose results are known exactly."""

from __future__ import annotations

import pytest
import torch

from segscope.models.mask2former.postprocess import (
    instance_inference,
    mask_logits_to_image,
    panoptic_inference,
    semantic_inference,
)

SURE = 10.0  # a logit whose sigmoid / softmax share is ~1
THING, STUFF = 0, 1
IS_THING = torch.tensor([True, False])  # class 0 is a thing, class 1 stuff; index 2 = no object


def _class_logits(*labels: int, num_classes: int = 2) -> torch.Tensor:
    """Queries sure of the given labels (``num_classes`` = no object)."""
    logits = torch.zeros(len(labels), num_classes + 1)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = SURE
    return logits


def _masks(*regions: torch.Tensor) -> torch.Tensor:
    """Mask logits: +SURE inside each bool region, -SURE outside."""
    return torch.stack([torch.where(r, SURE, -SURE) for r in regions])


def _columns(width: int, start: int, stop: int, height: int = 4) -> torch.Tensor:
    region = torch.zeros(height, width, dtype=torch.bool)
    region[:, start:stop] = True
    return region


def test_mask_logits_to_image_crops_the_padding_and_returns_the_original_size() -> None:
    # Padded input 64x64 (logits 16x16); the resized image is 40x48, so logits rows >= 10 and
    # columns >= 12 see only padding. A bilinear x4 upsample of the first 40 rows reads logit
    # rows up to 10, hence the marker starts one further out.
    logits = torch.zeros(2, 16, 16)
    logits[:, 11:, :] = 100.0
    logits[:, :, 13:] = 100.0
    out = mask_logits_to_image(logits, (64, 64), (40, 48), (30, 37))
    assert out.shape == (2, 30, 37)
    assert out.abs().max() == 0.0


def test_mask_logits_to_image_keeps_the_image_region_content() -> None:
    # A left/right split of the image region (plus the one padding row and column the
    # upsample reads) must survive the crop and the final resize.
    logits = torch.full((1, 16, 16), 100.0)
    logits[:, :11, :6] = -5.0
    logits[:, :11, 6:13] = 5.0
    out = mask_logits_to_image(logits, (64, 64), (40, 48), (80, 96))
    assert out.shape == (1, 80, 96)
    assert torch.all(out[0, :, :40] == -5.0)
    assert torch.all(out[0, :, -40:] == 5.0)


def test_mask_logits_to_image_rejects_an_image_larger_than_the_padding() -> None:
    with pytest.raises(ValueError, match="image_size"):
        mask_logits_to_image(torch.zeros(1, 8, 8), (32, 32), (40, 32), (40, 32))


def test_semantic_scores_sum_class_times_mask_probabilities_without_no_object() -> None:
    class_logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    mask_logits = torch.tensor([[[0.0, 4.0]], [[-1.0, 2.0]]])  # 2 queries, 1x2 pixels
    scores = semantic_inference(class_logits, mask_logits)
    class_probs = class_logits.softmax(-1)
    mask_probs = mask_logits.sigmoid()
    assert scores.shape == (2, 1, 2)
    for c in range(2):
        expected = class_probs[0, c] * mask_probs[0] + class_probs[1, c] * mask_probs[1]
        torch.testing.assert_close(scores[c], expected)


def test_panoptic_two_queries_give_the_expected_map_with_unclaimed_pixels_void() -> None:
    # A thing on columns 0-2, stuff on columns 4-7; column 3 is claimed by neither mask.
    prediction = panoptic_inference(
        _class_logits(THING, STUFF), _masks(_columns(8, 0, 3), _columns(8, 4, 8)), IS_THING
    )
    expected = torch.tensor([1, 1, 1, 0, 2, 2, 2, 2], dtype=torch.int32).expand(4, 8)
    assert prediction.panoptic_seg.dtype == torch.int32
    assert torch.equal(prediction.panoptic_seg, expected)
    assert [(s["id"], s["label"], s["isthing"], s["area"]) for s in prediction.segments] == [
        (1, THING, True, 12),
        (2, STUFF, False, 16),
    ]
    assert all(s["score"] > 0.99 for s in prediction.segments)


def test_panoptic_drops_a_query_mostly_hidden_by_a_more_confident_one() -> None:
    # Query 1 claims columns 0-9 but query 0, more confident, wins columns 0-5: 4/10 visible.
    class_logits = _class_logits(THING, THING, num_classes=2)
    class_logits[1, THING] = 4.0  # less confident than query 0, still above 0.8
    prediction = panoptic_inference(class_logits, _masks(_columns(10, 0, 6), _columns(10, 0, 10)), IS_THING)
    assert [s["label"] for s in prediction.segments] == [THING]
    assert torch.equal(prediction.panoptic_seg[:, :6], torch.ones(4, 6, dtype=torch.int32))
    assert torch.all(prediction.panoptic_seg[:, 6:] == 0)


def test_panoptic_keeps_a_query_visible_exactly_at_the_overlap_threshold() -> None:
    # Query 1 wins 4 of its 5 columns: ratio 0.8, kept by detectron2's "< threshold drops"
    # (HF's strict "> threshold keeps" would drop it).
    class_logits = _class_logits(THING, THING)
    class_logits[1, THING] = 4.0
    prediction = panoptic_inference(class_logits, _masks(_columns(10, 0, 1), _columns(10, 0, 5)), IS_THING)
    assert [s["area"] for s in prediction.segments] == [4, 16]
    assert torch.all(prediction.panoptic_seg[:, 1:5] == 2)


def test_panoptic_merges_stuff_queries_of_one_class_but_not_things() -> None:
    labels = (STUFF, THING, STUFF, THING)
    class_logits = _class_logits(*labels)
    class_logits[2, STUFF] = 5.0  # the two stuff queries differ in confidence
    regions = [_columns(8, 2 * i, 2 * i + 2) for i in range(4)]
    prediction = panoptic_inference(class_logits, _masks(*regions), IS_THING)
    expected = torch.tensor([1, 1, 2, 2, 1, 1, 3, 3], dtype=torch.int32).expand(4, 8)
    assert torch.equal(prediction.panoptic_seg, expected)
    stuff = prediction.segments[0]
    assert (stuff["label"], stuff["isthing"], stuff["area"]) == (STUFF, False, 16)
    assert stuff["score"] == pytest.approx(class_logits[0].softmax(-1).max().item())  # the larger score
    assert [(s["id"], s["label"]) for s in prediction.segments[1:]] == [(2, THING), (3, THING)]


def test_panoptic_skips_a_query_whose_won_pixels_all_lie_outside_its_mask() -> None:
    # Query 0's mask is pixel 0 only, which query 1 takes; query 0 still wins pixels 1-2 with
    # probability 0.4 (won/own = 2 passes the overlap test) but has no pixel left.
    class_logits = _class_logits(THING, STUFF)
    mask_probs = torch.tensor([[[0.9, 0.4, 0.4]], [[0.95, 0.1, 0.1]]])
    prediction = panoptic_inference(class_logits, torch.logit(mask_probs), IS_THING)
    assert [(s["id"], s["label"], s["area"]) for s in prediction.segments] == [(1, STUFF, 1)]
    assert prediction.panoptic_seg.tolist() == [[1, 0, 0]]


def test_panoptic_without_confident_objects_returns_no_segments_and_a_void_map() -> None:
    class_logits = torch.tensor([[0.0, 0.0, SURE], [1.0, 0.5, 0.0]])  # no object; score < 0.8
    prediction = panoptic_inference(class_logits, torch.full((2, 5, 6), SURE), IS_THING)
    assert prediction.segments == []
    assert torch.equal(prediction.panoptic_seg, torch.zeros(5, 6, dtype=torch.int32))


def test_panoptic_rejects_is_thing_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_inference(_class_logits(THING), _masks(_columns(4, 0, 2)), torch.tensor([True]))


def test_instance_score_is_class_probability_times_mean_mask_probability_inside() -> None:
    mask_probs = torch.tensor([[[0.9, 0.7, 0.2, 0.1]]])
    prediction = instance_inference(_class_logits(THING), torch.logit(mask_probs), top_k=1)
    class_prob = _class_logits(THING).softmax(-1)[0, THING]
    assert prediction.labels.tolist() == [THING]
    assert prediction.masks.tolist() == [[[True, True, False, False]]]
    torch.testing.assert_close(prediction.scores, class_prob * torch.tensor([0.9 + 0.7]) / (2 + 1e-6))


def test_instance_boxes_enclose_masks_and_empty_masks_get_a_zero_box_and_score() -> None:
    box_region = torch.zeros(6, 8, dtype=torch.bool)
    box_region[2:5, 1:6] = True
    empty = torch.zeros(6, 8, dtype=torch.bool)
    prediction = instance_inference(_class_logits(THING, THING), _masks(empty, box_region), top_k=2)
    assert prediction.boxes.tolist() == [[1.0, 2.0, 6.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    assert prediction.scores[1] == 0.0
    assert not prediction.masks[1].any()


def test_instance_takes_top_k_query_class_pairs_sorted_by_score() -> None:
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(5, 4), 3 * torch.randn(5, 6, 6)
    prediction = instance_inference(class_logits, mask_logits, top_k=7)
    assert prediction.masks.shape == (7, 6, 6) and prediction.boxes.shape == (7, 4)
    assert torch.all(prediction.scores[:-1] >= prediction.scores[1:])
    # More pairs asked for than exist: all 5 x 3 are returned.
    assert len(instance_inference(class_logits, mask_logits, top_k=100).scores) == 15


def test_instance_keeps_only_thing_classes_when_given_is_thing() -> None:
    class_logits = _class_logits(STUFF, THING, STUFF)
    prediction = instance_inference(class_logits, torch.randn(3, 4, 4), top_k=3, is_thing=IS_THING)
    # The top 3 pairs are the three sure ones; removing stuff after the top-k leaves one.
    assert prediction.labels.tolist() == [THING]


def test_inference_rejects_class_and_mask_logits_of_different_query_counts() -> None:
    with pytest.raises(ValueError, match="queries"):
        semantic_inference(torch.zeros(3, 4), torch.zeros(2, 5, 5))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_every_inference_stays_on_the_device_of_its_inputs(device: str) -> None:
    torch.manual_seed(0)
    class_logits = (3 * torch.randn(6, 3)).to(device)
    mask_logits = mask_logits_to_image(torch.randn(6, 4, 4, device=device), (16, 16), (12, 16), (9, 12))
    is_thing = IS_THING.to(device)
    panoptic = panoptic_inference(class_logits, mask_logits, is_thing, object_mask_threshold=0.3)
    instances = instance_inference(class_logits, mask_logits, top_k=5, is_thing=is_thing)
    outputs = [semantic_inference(class_logits, mask_logits), panoptic.panoptic_seg, *vars(instances).values()]
    assert all(t.device.type == device for t in outputs)
    assert panoptic.panoptic_seg.shape == (9, 12)
