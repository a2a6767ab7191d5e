"""Mask2Former's architecture post-processing against a straightforward full-resolution reference.

The reference (``_reference_*`` below) follows the rules documented in
``segscope/models/mask2former/postprocess.py`` literally: every query's logits go through
detectron2's two bilinear resizes (padded size, crop, original size) and each inference runs
on all of them. The architecture's ``postprocess`` resizes only the queries it needs and skips
resizes to an unchanged size; its results must be identical, bit for bit, except where semantic
scores tie to float rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from segscope.models.mask2former.model import Mask2FormerOutput
from segscope.predictions import ImageSizes, SemanticPrediction
from segscope.registry import get_architecture

NUM_CLASSES = 7
IS_THING = torch.tensor([True, True, True, True, False, False, False])
ARCHITECTURE = get_architecture("mask2former")
CONFIG = ARCHITECTURE.example_config(NUM_CLASSES)


def _reference_to_image(mask_logits: Tensor, sizes: ImageSizes) -> Tensor:
    """``[Q,h,w]`` -> ``[Q,H0,W0]``: resize to the padded size, crop, resize to the original size."""
    padded = F.interpolate(mask_logits[None], size=sizes.padded, mode="bilinear", align_corners=False)
    image = padded[..., : sizes.resized[0], : sizes.resized[1]]
    return F.interpolate(image, size=sizes.original, mode="bilinear", align_corners=False)[0]


def _reference_semantic(class_logits: Tensor, logits: Tensor) -> Tensor:
    """``[C,H,W]``: sum over queries of class probability ("no object" dropped) x mask probability."""
    return torch.einsum("qc,qhw->chw", class_logits.softmax(-1)[:, :-1], logits.sigmoid())


def _reference_panoptic(class_logits: Tensor, logits: Tensor, threshold: float) -> tuple[Tensor, list[dict]]:
    """Detectron2's panoptic rules over all queries at full resolution: id map and segments."""
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = labels.ne(NUM_CLASSES) & (scores > threshold)
    seg = torch.zeros(logits.shape[-2:], dtype=torch.int32)
    scores, labels, probs = scores[keep], labels[keep], logits[keep].sigmoid()
    if len(scores) == 0:
        return seg, []
    winner = (scores[:, None, None] * probs).argmax(0)
    segments: list[dict] = []
    stuff: dict[int, dict] = {}
    for k in range(len(scores)):
        won = winner == k
        own = probs[k] >= 0.5
        segment_pixels = won & own
        won_area, own_area, area = int(won.sum()), int(own.sum()), int(segment_pixels.sum())
        if won_area == 0 or own_area == 0 or area == 0 or won_area / own_area < CONFIG.overlap_threshold:
            continue
        label, isthing = int(labels[k]), bool(IS_THING[labels[k]])
        segment = None if isthing else stuff.get(label)
        if segment is None:
            score = float(scores[k])
            segment = {"id": len(segments) + 1, "label": label, "isthing": isthing, "score": score, "area": 0}
            segments.append(segment)
            if not isthing:
                stuff[label] = segment
        segment["score"] = max(segment["score"], float(scores[k]))
        segment["area"] += area
        seg[segment_pixels] = segment["id"]
    return seg, segments


def _reference_instances(class_logits: Tensor, logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k (query, class) pairs, things only, scored on full-resolution masks: masks, labels,
    scores, boxes sorted by descending score."""
    class_probs = class_logits.softmax(-1)[:, :-1].flatten()
    class_scores, pair = class_probs.topk(min(CONFIG.test_topk_per_image, class_probs.numel()))
    labels, queries = pair % NUM_CLASSES, pair // NUM_CLASSES
    thing = IS_THING[labels]
    class_scores, labels, queries = class_scores[thing], labels[thing], queries[thing]
    masks = logits[queries] > 0
    probs = logits[queries].sigmoid()
    mask_scores = (probs.flatten(1) * masks.flatten(1)).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    scores = class_scores * mask_scores
    order = scores.argsort(descending=True, stable=True)
    boxes = torch.zeros(len(queries), 4)
    for n, mask in enumerate(masks):
        if mask.any():
            ys, xs = mask.nonzero(as_tuple=True)
            boxes[n] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return masks[order], labels[order], scores[order], boxes[order]


def _postprocess(class_logits: Tensor, mask_logits: Tensor, sizes: ImageSizes, task: str, threshold: float | None):
    outputs = Mask2FormerOutput(class_logits=class_logits[None], mask_logits=mask_logits[None])
    (prediction,) = ARCHITECTURE.postprocess(CONFIG, outputs, [sizes], task, threshold, IS_THING)
    return prediction


def _random_logits(seed: int, queries: int, logit_size: tuple[int, int], confident: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(queries, NUM_CLASSES + 1, generator=generator)
    sure = torch.randperm(queries, generator=generator)[:confident]
    class_logits[sure, torch.randint(NUM_CLASSES, (confident,), generator=generator)] += 6.0
    return class_logits, 3 * torch.randn(queries, *logit_size, generator=generator)


def _blob_logits(queries: int, logit_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Square blobs, two identical queries (exact ties), every query confident of some class."""
    height, width = logit_size
    mask_logits = torch.full((queries, height, width), -4.0)
    for q in range(queries):
        y0, x0 = (q * 3) % max(height - 4, 1), (q * 5) % max(width - 4, 1)
        mask_logits[q, y0 : y0 + height // 2, x0 : x0 + width // 2] = 4.0 + q % 3
    mask_logits[1] = mask_logits[0]
    class_logits = torch.full((queries, NUM_CLASSES + 1), -3.0)
    class_logits[torch.arange(queries), torch.arange(queries) % NUM_CLASSES] = 5.0
    class_logits[1] = class_logits[0]
    return class_logits, mask_logits


# (logit size, padded, resized, original): equal sizes (every resize skipped), padding cropped,
# sizes not multiples of 4, non-square, up- and down-scaling, logits already at padded size.
SIZES = [
    ((12, 16), ImageSizes((48, 64), (48, 64), (48, 64))),
    ((12, 16), ImageSizes((48, 64), (45, 61), (45, 61))),
    ((12, 16), ImageSizes((48, 64), (41, 64), (30, 47))),
    ((10, 14), ImageSizes((40, 56), (37, 53), (75, 101))),
    ((9, 23), ImageSizes((36, 92), (33, 90), (33, 90))),
    ((20, 20), ImageSizes((20, 20), (18, 19), (37, 21))),
    ((12, 16), ImageSizes((12, 16), (12, 16), (12, 16))),
]
CASES = [
    pytest.param(*size, logits, id=f"{name}-{size[1].original[0]}x{size[1].original[1]}")
    for size in SIZES
    for name, logits in [
        ("random", lambda shape: _random_logits(0, 16, shape, confident=5)),
        ("none-kept", lambda shape: _random_logits(1, 12, shape, confident=0)),
        ("all-kept", lambda shape: _random_logits(2, 9, shape, confident=9)),
        ("blobs-ties", lambda shape: _blob_logits(10, shape)),
    ]
]


def _assert_semantic_equal(prediction: SemanticPrediction, expected: Tensor) -> None:
    """Labels equal the first best class of the reference scores ``expected [C,H,W]`` wherever its lead
    is beyond float rounding; where classes tie to rounding (the blobs' equal queries tie exactly in
    exact arithmetic), the product's summation order decides, so the label must be one of the tied
    best classes. Confidence is the best class's share of the summed scores."""
    top2 = expected.topk(2, dim=0).values
    rounding = 1e-6 * top2[0]
    clear = top2[0] - top2[1] > rounding
    assert torch.equal(prediction.labels[clear], expected.argmax(0)[clear])
    chosen = expected.gather(0, prediction.labels[None])[0]
    assert bool((chosen >= top2[0] - rounding).all())
    share = expected / expected.sum(0, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(prediction.confidence, share.max(0).values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("logit_size, sizes, make_logits", CASES)
def test_semantic_labels_equal_the_full_resolution_reference(logit_size, sizes, make_logits) -> None:
    class_logits, mask_logits = make_logits(logit_size)
    expected = _reference_semantic(class_logits, _reference_to_image(mask_logits, sizes))
    _assert_semantic_equal(_postprocess(class_logits, mask_logits, sizes, "semantic", None), expected)


@pytest.mark.parametrize("logit_size, sizes, make_logits", CASES)
def test_semantic_steps_and_tiles_of_any_size_equal_the_reference(logit_size, sizes, make_logits) -> None:
    """Both paths: steps ending mid-row (the GPU's) and tiles (the CPU's) of one pixel, ragged at the
    image's edges, and wider than the image, where seven classes leave bands scored whole and
    bands of pruned tiles; the tiles over bands of the image's logits and over bands resized from
    the network's (``mask_logits_bands``)."""
    from segscope.models.mask2former import postprocess

    class_logits, mask_logits = make_logits(logit_size)
    image_logits = _reference_to_image(mask_logits, sizes)
    expected = _reference_semantic(class_logits, image_logits)
    _assert_semantic_equal(postprocess.semantic_by_steps(class_logits, image_logits, step=97), expected)
    owned = image_logits.clone()  # the sigmoid taken into the logits
    _assert_semantic_equal(postprocess.semantic_by_steps(class_logits, owned, True, step=97), expected)
    resized = postprocess.mask_logits_bands(mask_logits, sizes.padded, sizes.resized, sizes.original)
    for tile in [(1, 1), (3, 5), (16, 256)]:
        prediction = postprocess.semantic_by_tiles(class_logits, resized.band, sizes.original, tile)
        _assert_semantic_equal(prediction, expected)

    def image_bands(top: int, bottom: int, out: Tensor) -> Tensor:
        return out.copy_(image_logits[:, top:bottom].permute(1, 2, 0))

    _assert_semantic_equal(postprocess.semantic_by_tiles(class_logits, image_bands, sizes.original), expected)


def _many_class_logits(kind: str, classes: int = 60, queries: int = 40) -> tuple[Tensor, Tensor]:
    """``[Q,C+1]``, ``[Q,12,16]`` logits with more classes than the screen's strong ones: white-noise
    masks with six sure queries, off in the left quarter (a random model's pixels there), a
    random model's everywhere (no sure query), or that noise above a scene (four sure queries,
    each on one quarter of the bottom half)."""
    generator = torch.Generator().manual_seed(7)
    class_logits = torch.randn(queries, classes + 1, generator=generator)
    mask_logits = 3 * torch.randn(queries, 12, 16, generator=generator)
    if kind in ("sure-queries", "noise-above-scene"):
        class_logits[torch.arange(6), torch.arange(6) * 7] += 9.0
        mask_logits[:6, :, :4] = -8.0
    if kind == "noise-above-scene":
        mask_logits[:, 6:] = -8.0
        for quarter in range(4):
            mask_logits[quarter, 6:, 4 * quarter : 4 * quarter + 4] = 8.0
    return class_logits, mask_logits


@pytest.mark.parametrize("kind", ["sure-queries", "random-model", "noise-above-scene"])
def test_semantic_tiles_screen_and_every_class_equal_the_reference(kind: str, monkeypatch) -> None:
    """60 classes in bands of 2 rows: where the tiles' bounds keep most classes, the class screen
    settles most pixels of a band with sure queries and leaves the rest to the every-class
    product; a random model's bands never pay for the screen, which is then skipped ever longer."""
    from segscope.models.mask2former import postprocess

    class_logits, mask_logits = _many_class_logits(kind)
    sizes = ImageSizes((48, 64), (45, 61), (45, 61))
    expected = _reference_semantic(class_logits, _reference_to_image(mask_logits, sizes))
    screened: list[tuple[int, int]] = []  # (pixels, pixels left) per screened step

    def spy(classes, pixels, labels, confidence):
        rest = postprocess_screen(classes, pixels, labels, confidence)
        screened.append((len(pixels), len(rest)))
        return rest

    postprocess_screen = postprocess.screen
    monkeypatch.setattr(postprocess, "screen", spy)
    bands = postprocess.mask_logits_bands(mask_logits, sizes.padded, sizes.resized, sizes.original)
    _assert_semantic_equal(postprocess.semantic_by_tiles(class_logits, bands.band, sizes.original, (2, 16)), expected)
    seen, left = (sum(column) for column in zip(*screened))
    if kind == "sure-queries":  # most of the 23 bands screened, most of their pixels settled
        assert len(screened) >= 12 and 0 < left < seen / 2
    elif kind == "random-model":  # nothing settled: screened in bands 0, 2, 6 and 14 only
        assert len(screened) == 4 and left == seen
    else:  # the scene's bands settled by the tiles' bounds
        assert 0 < len(screened) < 16 and left > 0


@pytest.mark.parametrize("logit_size, sizes, make_logits", CASES[::4])
def test_mask_logits_bands_equal_the_resized_logits(logit_size, sizes, make_logits) -> None:
    """Every band, of any height, is those rows of ``mask_logits_to_image``, pixel-major (to float
    rounding: outputs this small go through aten's other bilinear kernel, which rounds differently)."""
    from segscope.models.mask2former import postprocess

    _, mask_logits = make_logits(logit_size)
    expected = postprocess.mask_logits_to_image(mask_logits, sizes.padded, sizes.resized, sizes.original)
    bands = postprocess.mask_logits_bands(mask_logits, sizes.padded, sizes.resized, sizes.original)
    assert bands.size == sizes.original
    for rows in (1, 3, sizes.original[0]):
        for top in range(0, sizes.original[0], rows):
            band = bands.band(top, min(top + rows, sizes.original[0]))
            torch.testing.assert_close(band, expected[:, top : top + rows].permute(1, 2, 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "sizes", [ImageSizes((800, 1088), (800, 1066), (480, 640)), ImageSizes((512, 640), (500, 627), (1000, 1254))]
)
def test_mask_logits_bands_at_pipeline_sizes_equal_the_resized_logits_to_the_bit(sizes) -> None:
    """A photo's sizes (shortest side 800, padding, back to the original): the same values as
    ``mask_logits_to_image``, to the bit on the build where that was measured (see test_bilinear)."""
    from segscope.models.mask2former import postprocess

    logit_size = (sizes.padded[0] // 4, sizes.padded[1] // 4)
    _, mask_logits = _random_logits(6, 6, logit_size, confident=0)
    size_args = (sizes.padded, sizes.resized, sizes.original)
    expected = postprocess.mask_logits_to_image(mask_logits, *size_args).permute(1, 2, 0)
    bands = postprocess.mask_logits_bands(mask_logits, *size_args)
    height = sizes.original[0]
    resized = torch.cat([bands.band(top, min(top + 16, height)) for top in range(0, height, 16)])
    torch.testing.assert_close(resized, expected, rtol=1e-6, atol=1e-6)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert torch.equal(resized, expected)


@pytest.mark.parametrize("make_logits", [lambda: _random_logits(5, 30, (6, 9), 10), lambda: _blob_logits(10, (6, 9))])
def test_tile_candidates_hold_every_pixels_best_class(make_logits) -> None:
    """Over many tiles (2-row bands from every row and column, cut into tiles 3 wide, the last one
    narrower) of random and blob logits: each pixel's best class, and every class within
    rounding of it, is a candidate of its tile."""
    from segscope.models.mask2former import postprocess

    class_logits, mask_logits = make_logits()
    class_probs = class_logits.softmax(-1)[:, :-1]
    probs = mask_logits.sigmoid().permute(1, 2, 0)  # [H,W,Q]
    scores = torch.einsum("qc,hwq->chw", class_probs, probs)
    for top in range(probs.shape[0] - 1):
        for left in range(probs.shape[1] - 1):
            band = probs[top : top + 2, left:]
            candidates = postprocess.tile_candidates(class_probs.t().contiguous(), band, 3)
            assert candidates.shape == (-(-band.shape[1] // 3), NUM_CLASSES)
            for tile, tile_candidates in enumerate(candidates):
                window = slice(left + 3 * tile, left + 3 * tile + 3)
                tile_scores = scores[:, top : top + 2, window].reshape(NUM_CLASSES, -1)
                near_best = (tile_scores >= tile_scores.max(0).values * (1 - 1e-6)).any(1)
                assert not bool((near_best & ~tile_candidates).any())


def test_tile_candidates_drop_classes_that_cannot_win() -> None:
    """A tile where one confident query covers every pixel and the rest are off: only its class;
    the next tile, where the second query covers everything, only that one's."""
    class_logits = torch.full((4, NUM_CLASSES + 1), -5.0)
    class_logits[torch.arange(4), torch.tensor([2, 5, 0, 2])] = 5.0
    probs = torch.tensor([[0.98, 0.99, 0.97], [0.02, 0.01, 0.03], [0.05, 0.0, 0.1], [0.1, 0.2, 0.3]])
    band = torch.cat([probs, probs[[1, 0, 2, 3]]], 1).t()[None]  # [1,6,Q]: two tiles of 3 columns
    from segscope.models.mask2former import postprocess

    candidates = postprocess.tile_candidates(class_logits.softmax(-1)[:, :-1].t().contiguous(), band, 3)
    assert [tile.nonzero()[:, 0].tolist() for tile in candidates] == [[2], [5]]


def test_semantic_prediction_of_scores_takes_the_first_argmax_and_its_share() -> None:
    scores = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]], [[3.0, 0.0]]])
    prediction = SemanticPrediction.from_scores(scores)
    assert prediction.labels.tolist() == [[1, 0]]
    torch.testing.assert_close(prediction.confidence, torch.tensor([[3.0 / 7.0, 0.0]]))


@pytest.mark.parametrize("task", ["panoptic", "semantic", "instance"])
def test_postprocessing_leaves_the_network_logits_unchanged(task: str) -> None:
    """At stride 1 the image's logits are the network's own tensor: the in-place sigmoid must not touch it."""
    class_logits, mask_logits = _random_logits(3, 8, (12, 16), confident=4)
    kept = mask_logits.clone()
    threshold = ARCHITECTURE.default_threshold(CONFIG, task)
    _postprocess(class_logits, mask_logits, ImageSizes((12, 16), (12, 16), (12, 16)), task, threshold)
    assert torch.equal(mask_logits, kept)


@pytest.mark.parametrize("logit_size, sizes, make_logits", CASES)
def test_panoptic_segments_equal_the_full_resolution_reference(logit_size, sizes, make_logits) -> None:
    class_logits, mask_logits = make_logits(logit_size)
    threshold = CONFIG.object_mask_threshold
    expected_seg, expected_segments = _reference_panoptic(
        class_logits, _reference_to_image(mask_logits, sizes), threshold
    )
    prediction = _postprocess(class_logits, mask_logits, sizes, "panoptic", threshold)
    assert torch.equal(prediction.panoptic_seg, expected_seg)
    assert [dict(segment) for segment in prediction.segments] == expected_segments


@pytest.mark.parametrize("threshold", [0.0, 0.5])
@pytest.mark.parametrize("logit_size, sizes, make_logits", CASES)
def test_instances_above_the_threshold_equal_the_full_resolution_reference(
    logit_size, sizes, make_logits, threshold: float
) -> None:
    class_logits, mask_logits = make_logits(logit_size)
    masks, labels, scores, boxes = _reference_instances(class_logits, _reference_to_image(mask_logits, sizes))
    prediction = _postprocess(class_logits, mask_logits, sizes, "instance", threshold)
    # The pipeline keeps scores >= threshold; candidates that cannot reach it may be left out.
    kept, expected_kept = prediction.scores >= threshold, scores >= threshold
    assert torch.equal(prediction.masks[kept], masks[expected_kept])
    assert torch.equal(prediction.labels[kept], labels[expected_kept])
    # A float32 sum over a mask's pixels may round differently when torch reduces a different
    # number of rows at once (its threads split the work by the output size), so the mean mask
    # probability can move by an ulp once fewer candidates are scored; with all of them kept
    # (threshold 0) the scores are identical.
    if threshold == 0.0:
        assert torch.equal(prediction.scores, scores)
    torch.testing.assert_close(prediction.scores[kept], scores[expected_kept], rtol=1e-6, atol=0)
    assert torch.equal(prediction.boxes[kept], boxes[expected_kept])
    if threshold == 0.0:
        assert len(prediction.scores) == len(scores)


def test_subset_resize_equals_rows_of_the_full_resize() -> None:
    """Resizing is per query: the premise of resizing only the kept queries."""
    from segscope.models.mask2former.postprocess import mask_logits_to_image

    _, mask_logits = _random_logits(3, 20, (50, 76), confident=0)
    sizes = ((200, 304), (197, 301), (411, 333))
    rows = torch.tensor([0, 3, 4, 17])
    assert torch.equal(mask_logits_to_image(mask_logits[rows], *sizes), mask_logits_to_image(mask_logits, *sizes)[rows])


def test_skipped_identity_resizes_equal_interpolating_to_the_same_size() -> None:
    from segscope.models.mask2former.postprocess import mask_logits_to_image

    _, mask_logits = _random_logits(4, 5, (40, 60), confident=0)
    sizes = ImageSizes((40, 60), (40, 60), (40, 60))
    resized = mask_logits_to_image(mask_logits, sizes.padded, sizes.resized, sizes.original)
    assert torch.equal(resized, _reference_to_image(mask_logits, sizes))


@pytest.mark.parametrize("logit_size, sizes, make_logits", CASES[4:12])
def test_panoptic_pixel_chunks_do_not_change_the_segments(logit_size, sizes, make_logits, monkeypatch) -> None:
    """Chunk boundaries that fall mid-row (97 pixels) give the same map as the whole image."""
    from segscope.models.mask2former import postprocess

    class_logits, mask_logits = make_logits(logit_size)
    threshold = CONFIG.object_mask_threshold
    expected_seg, expected_segments = _reference_panoptic(
        class_logits, _reference_to_image(mask_logits, sizes), threshold
    )
    monkeypatch.setattr(postprocess, "_PIXEL_CHUNK", 97)
    prediction = _postprocess(class_logits, mask_logits, sizes, "panoptic", threshold)
    assert torch.equal(prediction.panoptic_seg, expected_seg)
    assert [dict(segment) for segment in prediction.segments] == expected_segments


def test_a_shortcut_that_fails_is_skipped_1_then_3_then_7_times_until_it_pays() -> None:
    from segscope.models.mask2former.postprocess import _Backoff

    backoff, outcomes, tried = _Backoff(), iter([False, False, True, False, True]), []
    for turn in range(10):
        if backoff.due():
            tried.append(turn)
            backoff.paid(next(outcomes))
    assert tried == [0, 2, 6, 7, 9]
