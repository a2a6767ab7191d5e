"""Post-processing against HF transformers' ``Mask2FormerImageProcessor.post_process_*``.

HF first resizes mask logits to 384x384; the logits here are drawn at 384x384, where that
bilinear resize is the identity (checked below), so both sides see the same logits.

Semantic and instance inference agree with HF outright. Panoptic inference follows
detectron2, whose rules differ from HF's (see ``panoptic_inference``); the panoptic test
predicts this module's output from HF's: each HF segment minus the pixels its query won
with mask probability < 0.5, minus the queries detectron2's unweighted overlap test drops.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from segscope.models.mask2former.postprocess import (  # noqa: E402
    instance_inference,
    panoptic_inference,
    semantic_inference,
)

SIZE = 384
NUM_CLASSES = 10
NUM_QUERIES = 20
THING_CLASSES = 6  # classes 0-5 are things, 6-9 stuff
THRESHOLD = 0.8  # detectron2's object-mask and overlap thresholds


@pytest.fixture(scope="module")
def processor() -> transformers.Mask2FormerImageProcessor:
    return transformers.Mask2FormerImageProcessor()


def _hf_outputs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> SimpleNamespace:
    """A batch of one in the attribute names HF's post-processing reads."""
    return SimpleNamespace(class_queries_logits=class_logits[None], masks_queries_logits=mask_logits[None])


def _random_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    class_logits = 3 * torch.randn(NUM_QUERIES, NUM_CLASSES + 1, generator=generator)
    mask_logits = 3 * torch.randn(NUM_QUERIES, SIZE, SIZE, generator=generator)
    return class_logits, mask_logits


def _tiles(*indices: int) -> torch.Tensor:
    """The union of tiles of a 4x4 grid over the image, numbered row by row."""
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    side = SIZE // 4
    for index in indices:
        row, col = divmod(index, 4)
        region[row * side : (row + 1) * side, col * side : (col + 1) * side] = True
    return region


def _panoptic_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of an image tiled by queries, built so every panoptic rule is exercised.

    Queries 0-11 and 15 each own a tile: things with confident masks, stuff with noisy ones
    whose holes (mask probability < 0.5) are still won by their owner. Stuff classes 6, 8, 9
    each have two queries (fused). Query 12 (class probability ~0.87) owns tile 12 and weakly
    claims tile 8 (mask probability ~0.55, below 0.5 once weighted): HF's weighted overlap
    test keeps it, detectron2's drops it. Queries 13 and 14 claim several owned tiles with
    lower masks and are dropped by both overlap tests. Queries 16-17 predict no object and
    18-19 are below the class threshold. Tiles 14 and 15 are claimed only by 13 and 14.
    """
    generator = torch.Generator().manual_seed(0)
    labels = [0, 1, 2, 0, 3, 5, 6, 6, 7, 8, 8, 9, 4, 2, 1, 9, NUM_CLASSES, NUM_CLASSES, 3, 7]
    class_logits = 0.3 * torch.randn(NUM_QUERIES, NUM_CLASSES + 1, generator=generator)
    class_logits[torch.arange(NUM_QUERIES), torch.tensor(labels)] += 7.0
    class_logits[12, 4] = 4.2
    class_logits[18, 3] = class_logits[19, 7] = 3.0

    noise = F.interpolate(torch.randn(1, NUM_QUERIES, 6, 6, generator=generator), size=(SIZE, SIZE), mode="bicubic")[0]
    mask_logits = -4.0 + 0.5 * noise
    owners = {q: q for q in range(13)} | {15: 13}
    for query, tile in owners.items():
        region = _tiles(tile)
        is_stuff = labels[query] >= THING_CLASSES
        mask_logits[query][region] = (2.0 + 2.5 * noise[query] if is_stuff else 5.0 + 0.5 * noise[query])[region]
    for query, tiles in ((13, (0, 1, 4, 5, 14)), (14, (2, 3, 15))):
        region = _tiles(*tiles)
        mask_logits[query][region] = (1.0 + 0.3 * noise[query])[region]
    mask_logits[12][_tiles(8)] = (0.2 + 0.05 * noise[12])[_tiles(8)]
    mask_logits[16:] = 3.0 + noise[16:]  # would matter, were these queries kept
    return class_logits, mask_logits


def test_hf_resize_to_384_is_the_identity_on_384_logits() -> None:
    logits = torch.randn(1, 3, SIZE, SIZE)
    resized = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.equal(resized, logits)


@pytest.mark.parametrize("target_size", [None, (SIZE, SIZE)])
def test_semantic_scores_and_map_match_hf_at_the_logit_size(
    processor: transformers.Mask2FormerImageProcessor, target_size: tuple[int, int] | None
) -> None:
    class_logits, mask_logits = _random_logits(seed=1)
    hf = processor.post_process_semantic_segmentation(
        _hf_outputs(class_logits, mask_logits),
        target_sizes=None if target_size is None else [target_size],
        return_segmentation_scores=True,
    )[0]
    scores = semantic_inference(class_logits, mask_logits)
    torch.testing.assert_close(scores, hf["segmentation_scores"], rtol=0, atol=1e-6)
    assert torch.equal(scores.argmax(0), hf["segmentation"])


def test_semantic_scores_resized_like_hf_match_hf_at_another_size(
    processor: transformers.Mask2FormerImageProcessor,
) -> None:
    class_logits, mask_logits = _random_logits(seed=2)
    target_size = (200, 300)
    hf = processor.post_process_semantic_segmentation(
        _hf_outputs(class_logits, mask_logits), target_sizes=[target_size], return_segmentation_scores=True
    )[0]
    scores = semantic_inference(class_logits, mask_logits)
    resized = F.interpolate(scores[None], size=target_size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resized, hf["segmentation_scores"], rtol=0, atol=1e-6)
    assert torch.equal(resized.argmax(0), hf["segmentation"])


def test_panoptic_equals_hf_segments_under_detectron2_rules(processor: transformers.Mask2FormerImageProcessor) -> None:
    class_logits, mask_logits = _panoptic_scene()
    hf = processor.post_process_panoptic_segmentation(
        _hf_outputs(class_logits, mask_logits),
        threshold=THRESHOLD,
        overlap_mask_area_threshold=THRESHOLD,
        label_ids_to_fuse=set(range(THING_CLASSES, NUM_CLASSES)),
    )[0]
    ours = panoptic_inference(class_logits, mask_logits, torch.arange(NUM_CLASSES) < THING_CLASSES)

    # The per-pixel winner among queries kept by class score, computed alike by both.
    scores, labels = class_logits.softmax(-1).max(-1)
    kept = ((labels != NUM_CLASSES) & (scores > THRESHOLD)).nonzero().flatten()
    probs = mask_logits[kept].sigmoid()
    winner = (scores[kept, None, None] * probs).argmax(0)
    in_mask = probs.gather(0, winner[None])[0] >= 0.5
    won_area = torch.bincount(winner.flatten(), minlength=len(kept))
    own_area = (probs >= 0.5).flatten(1).sum(1)

    hf_seg = hf["segmentation"]
    entries_by_id: dict[int, list[dict]] = defaultdict(list)
    for entry in hf["segments_info"]:
        entries_by_id[entry["id"]].append(entry)

    expected = []  # (pixels, label, score) of each segment detectron2's rules give
    dropped_by_unweighted_overlap = trimmed_pixels = 0
    for segment_id, entries in entries_by_id.items():
        region = hf_seg == segment_id
        queries = torch.unique(winner[region]).tolist()
        # An HF segment is the union of its queries' won pixels, listed once per query in order.
        assert torch.equal(region, torch.isin(winner, torch.tensor(queries)))
        assert [e["label_id"] for e in entries] == [labels[kept[k]].item() for k in queries]
        pixels = torch.zeros_like(region)
        segment_scores = []
        for k, entry in zip(queries, entries):
            own = (winner == k) & in_mask
            if won_area[k] / own_area[k] >= THRESHOLD and own.any():
                pixels |= own
                segment_scores.append(entry["score"])
                trimmed_pixels += int(((winner == k) & ~in_mask).sum())
            else:
                dropped_by_unweighted_overlap += 1
        if segment_scores:
            expected.append((pixels, entries[0]["label_id"], max(segment_scores)))

    # Queries HF drops for overlap are dropped by detectron2's rules too (its test is stricter).
    dropped_by_hf = [k for k in range(len(kept)) if not (hf_seg[winner == k] > 0).any()]
    assert all(won_area[k] / own_area[k] < THRESHOLD for k in dropped_by_hf)

    # The sample exercises every rule, so the comparison below cannot pass vacuously.
    assert len(expected) >= 8
    assert sum(len(entries) >= 2 for entries in entries_by_id.values()) >= 2  # fused stuff
    assert len(dropped_by_hf) >= 2 and dropped_by_unweighted_overlap >= 1
    assert trimmed_pixels > 1000
    assert 0 < int((labels == NUM_CLASSES).sum()) < NUM_QUERIES - len(kept)  # no object, low score

    assert len(ours.segments) == len(expected)
    segments_by_id = {s["id"]: s for s in ours.segments}
    covered = torch.zeros_like(hf_seg, dtype=torch.bool)
    for pixels, label, score in expected:
        ids = torch.unique(ours.panoptic_seg[pixels])
        assert len(ids) == 1
        segment = segments_by_id[int(ids)]
        assert torch.equal(ours.panoptic_seg == segment["id"], pixels)
        assert (segment["label"], segment["area"]) == (label, int(pixels.sum()))
        assert abs(segment["score"] - score) <= 1e-6  # HF rounds scores to 6 decimals
        covered |= pixels
    assert torch.equal(ours.panoptic_seg == 0, ~covered)


def test_instance_scores_labels_and_masks_match_hf(processor: transformers.Mask2FormerImageProcessor) -> None:
    class_logits, mask_logits = _random_logits(seed=3)
    class_logits[0, 0] = 9.0  # certainly among the top pairs...
    mask_logits[0] = -1.0  # ...with an empty mask, which HF leaves out
    hf = processor.post_process_instance_segmentation(
        _hf_outputs(class_logits, mask_logits), threshold=0.0, return_binary_maps=True
    )[0]
    ours = instance_inference(class_logits, mask_logits, top_k=NUM_QUERIES)  # HF's top-k is Q

    nonempty = ours.masks.flatten(1).any(1)
    assert len(ours.scores) == NUM_QUERIES and int((~nonempty).sum()) >= 1
    assert torch.all(ours.boxes[~nonempty] == 0) and torch.all(ours.scores[~nonempty] == 0)

    hf_scores = torch.tensor([s["score"] for s in hf["segments_info"]])
    assert len(hf_scores.unique()) == len(hf_scores)  # so sorting pairs entries unambiguously
    order = hf_scores.argsort(descending=True)
    hf_labels = torch.tensor([s["label_id"] for s in hf["segments_info"]])[order]
    torch.testing.assert_close(ours.scores[nonempty], hf_scores[order], rtol=0, atol=1e-6)
    assert torch.equal(ours.labels[nonempty], hf_labels)
    assert torch.equal(ours.masks[nonempty], hf["segmentation"][order].bool())
