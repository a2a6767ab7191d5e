"""Mask2Former's three inferences over one image's class and mask logits.

All three read the same two outputs of the last decoder layer: ``class_logits [Q,C+1]`` (the
last column is "no object") and ``mask_logits [Q,H,W]``, already brought to the image's
original size by ``mask_logits_to_image``. They follow detectron2's Mask2Former test-time
rules (``maskformer_model.py``: semantic, panoptic and instance inference); the defaults are
its test settings. Batching is the caller's loop; every function works on the inputs' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from segscope.models.mask2former.class_screen import ClassScreen, class_screen, pad_columns, screen
from segscope.models.ops.argmax import RowArgmax
from segscope.models.ops.bilinear import BandedResize, LinearAxis, ResizeStage, linear_axis
from segscope.models.ops.boxes import mask_boxes
from segscope.predictions import InstancePrediction, PanopticPrediction, Segment, SemanticPrediction, class_share

# Keeps the mean mask probability of an empty mask finite (detectron2's value).
_EMPTY_MASK_EPS = 1e-6


def mask_logits_to_image(
    mask_logits: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    original_size: tuple[int, int],
) -> Tensor:
    """Mask logits ``[Q,h,w]`` at the network's output stride -> ``[Q,H0,W0]`` on the original image.

    Bilinearly upsamples to the padded input ``padded_size (Hp,Wp)``, keeps the top-left
    ``image_size (h1,w1)`` (the resized image before padding) and bilinearly resizes that to
    ``original_size (H0,W0)``; detectron2's order, so padding never bleeds into the result.
    Queries are resized independently, so resizing a subset ``mask_logits[idx]`` gives exactly
    the rows ``idx`` of the full result: callers resize only the queries their inference keeps.
    """
    padded_size, image_size, original_size = _image_sizes(mask_logits, padded_size, image_size, original_size)
    padded = _resize(mask_logits, padded_size)
    image = padded[:, : image_size[0], : image_size[1]]
    return _resize(image, original_size).contiguous()


def mask_logits_bands(
    mask_logits: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    original_size: tuple[int, int],
) -> BandedResize:
    """``mask_logits_to_image`` as bands of rows: ``bands.band(top, bottom)`` is ``[r,W0,Q]`` float32,
    the same values as ``mask_logits_to_image(...)[:, top:bottom]`` in pixel-major layout.

    Each band resizes only the logits its rows read (``ops.bilinear``), so the whole
    ``[Q,H0,W0]`` map is never held. The crop to ``image_size`` keeps the first outputs of the
    first resize's axes, or, on an axis already at the padded size, the first rows or columns.
    """
    padded_size, image_size, original_size = _image_sizes(mask_logits, padded_size, image_size, original_size)
    pixels = mask_logits.permute(1, 2, 0).float().contiguous()  # [h,w,Q]
    first: list[LinearAxis | None] = []
    for dim, (size, padded, kept) in enumerate(zip(pixels.shape[:2], padded_size, image_size)):
        axis = linear_axis(size, padded)
        if axis is None:  # already at the padded size: the crop is a narrower input
            pixels = pixels.narrow(dim, 0, kept)
            first.append(None)
        else:
            first.append(axis.outputs(0, kept))
    second = (linear_axis(kept, size) for kept, size in zip(image_size, original_size))
    return BandedResize(pixels, [ResizeStage(*first), ResizeStage(*second)])


def _image_sizes(
    mask_logits: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The three sizes of ``mask_logits_to_image`` as int pairs, after checking them and the logits' shape."""
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [Q,h,w], got shape {tuple(mask_logits.shape)}")
    padded_size, image_size, original_size = (_size(s) for s in (padded_size, image_size, original_size))
    if not all(0 < i <= p for i, p in zip(image_size, padded_size)):
        raise ValueError(f"image_size {image_size} must be positive and fit in padded_size {padded_size}")
    if min(original_size) <= 0:
        raise ValueError(f"original_size must be positive, got {original_size}")
    return padded_size, image_size, original_size


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``maps [Q,h,w]`` to ``size``; skipped when the size is unchanged.

    At scale 1 every output pixel's source coordinate is its own index (interpolation weights
    1 and 0), so the resize would return its input exactly; skipping it saves a full pass.
    """
    if tuple(maps.shape[-2:]) == size:
        return maps
    if maps.shape[0] == 0:
        return maps.new_empty((0, *size))
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def semantic_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class score maps ``[C,h,w]`` of ``class_logits [Q,C+1]``, ``mask_logits [Q,h,w]`` at any size.

    Over queries, the sum of class probability x mask probability; class probabilities are the
    softmax over ``C+1`` with "no object" then dropped, so a pixel's scores need not sum to 1.
    """
    _num_classes(class_logits, mask_logits)
    return torch.einsum("qc,qhw->chw", _class_probs(class_logits), mask_logits.sigmoid())


def _class_probs(class_logits: Tensor) -> Tensor:
    """``[Q,C]`` class probabilities of ``class_logits [Q,C+1]``, "no object" dropped after the softmax."""
    return class_logits.softmax(-1)[:, :-1]


# Pixels per step of ``semantic_by_steps``: on a GPU, steps large enough to keep it busy.
_SEMANTIC_STEP = 1 << 18
# Tile (rows, columns) of ``semantic_by_tiles``: rows of a band, columns of a tile in it whose
# class bounds are taken together. 16 x 256 measured fastest of 8 to 64 rows x 128 to 512
# columns at 800x1216 on both of bench_postprocess's logits (a taller or wider tile keeps more
# classes; a shorter band costs more ops).
_SEMANTIC_TILE = (16, 256)
# Pixels per product where a band of ``semantic_by_tiles`` is scored whole: its [step,C] scores
# stay in cache (4096 to 8192 measured fastest here).
_SEMANTIC_CPU_STEP = 8192
# A class is dropped from a tile only when its upper bound trails the best lower bound by this
# fraction: far more than the float rounding of the bounds' 100-term sums (~1e-5 at worst), so
# a dropped class can never have been the best, nor tied with it.
_PRUNE_MARGIN = 1e-4
# Queries whose single terms bound a tile's best scores from below (``tile_candidates``).
_BOUNDING_QUERIES = 4


def semantic_from_outputs(
    class_logits: Tensor,
    mask_logits: Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    original_size: tuple[int, int],
) -> SemanticPrediction:
    """``SemanticPrediction.from_scores(semantic_scores(class_logits, mask_logits_to_image(...)))``
    without the ``[C,H0,W0]`` map, from one image's network outputs: ``class_logits [Q,C+1]``
    and ``mask_logits [Q,h,w]`` at stride 4.

    On the CPU band by band (``mask_logits_bands``, then ``semantic_by_tiles``): no ``[Q,H0,W0]``
    map is held. Elsewhere the resized logits are scored in steps, their sigmoid taken in place
    unless the resize returned the network's own tensor.
    """
    _num_classes(class_logits, mask_logits)
    if mask_logits.device.type == "cpu":
        bands = mask_logits_bands(mask_logits, padded_size, image_size, original_size)
        return semantic_by_tiles(class_logits, bands.band, bands.size)
    image_logits = mask_logits_to_image(mask_logits, padded_size, image_size, original_size).float()
    fresh = image_logits.untyped_storage().data_ptr() != mask_logits.untyped_storage().data_ptr()
    return semantic_by_steps(class_logits, image_logits, in_place=fresh)


def semantic_by_steps(
    class_logits: Tensor, mask_logits: Tensor, in_place: bool = False, step: int = _SEMANTIC_STEP
) -> SemanticPrediction:
    """The best class and its share at each pixel of ``mask_logits [Q,H,W]`` (at the image's size),
    in steps of ``step`` pixels, every class scored at every pixel; no host syncs (the GPU's path).

    Each step takes the sigmoid of its ``[Q,step]`` logits (in place with ``in_place``, for a
    caller that owns them), then scores them (``_EveryClass``, with torch's argmax).
    """
    num_queries, height, width = mask_logits.shape
    num_classes = class_logits.shape[1] - 1
    class_columns = _class_columns(class_logits)
    pixels = mask_logits.reshape(num_queries, height * width)
    labels = mask_logits.new_empty(height * width, dtype=torch.int64)
    confidence = mask_logits.new_empty(height * width, dtype=torch.float32)
    buffer = pixels.new_empty(min(step, height * width), class_columns.shape[1])
    every_class = _EveryClass(class_columns, num_classes, buffer, _torch_argmax)
    for start in range(0, height * width, step):
        window = slice(start, start + step)
        logits = pixels[:, window]
        probs = logits.sigmoid_() if in_place else logits.sigmoid()
        every_class(probs.t(), labels[window], confidence[window])
    return SemanticPrediction(labels=labels.view(height, width), confidence=confidence.view(height, width))


def semantic_by_tiles(
    class_logits: Tensor,
    bands: Callable[[int, int, Tensor], Tensor],
    size: tuple[int, int],
    tile: tuple[int, int] = _SEMANTIC_TILE,
) -> SemanticPrediction:
    """``semantic_by_steps``' result band by band, scoring only the classes that can win (the CPU's path).

    ``bands(top, bottom, out)`` writes the mask logits of rows ``[top,bottom)`` of an image of
    ``size`` into ``out``, pixel-major ``[r,W,Q]`` (this function takes their sigmoid there). The
    image goes in bands of ``tile[0]`` rows, each through the first of three ways that works:
    1. ``tile_candidates`` bounds every class's score in each tile of ``tile[1]`` columns and
       keeps those that can win there. A trained model's band keeps a few classes, so its
       ``[n,Q] x [Q,K]`` product shrinks from ``K = C`` to their union.
    2. Where more than half remain, ``class_screen`` proves at most pixels that the best class
       is one of a few strong ones (classes some query is sure of), from a 16-column product.
    3. The pixels left, or a band where neither pays, score every class, in steps that stay
       in cache, each pixel's best class found by ``RowArgmax``.
    A way that did not pay in a band is skipped for the next 1, then 3, 7, ... bands, until
    it pays again (white noise logits never let 1 pay; a random model's never let 2).
    Each pixel's sum over classes comes from one more column. Syncs a few times per band.
    """
    height, width = size
    class_columns = _class_columns(class_logits)  # [Q,C+1+padding]
    num_classes = class_logits.shape[1] - 1
    class_major = class_columns[:, :num_classes].t().contiguous()  # [C,Q]
    strong = class_screen(class_columns[:, :num_classes])
    sum_column = torch.tensor([num_classes], device=class_logits.device)
    labels = class_logits.new_empty((height, width), dtype=torch.int64)
    confidence = class_logits.new_empty((height, width), dtype=torch.float32)
    rows, cols = tile
    band_buffer = class_logits.new_empty(min(rows, height) * width, class_columns.shape[0])  # [r*W,Q]
    bounds, screening = _Backoff(), _Backoff()
    with RowArgmax() as row_argmax:
        buffer = class_logits.new_empty(min(_SEMANTIC_CPU_STEP, rows * width), class_columns.shape[1])
        every_class = _EveryClass(class_columns, num_classes, buffer, row_argmax)
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            probs = bands(top, bottom, band_buffer[: (bottom - top) * width].view(bottom - top, width, -1)).sigmoid_()
            pixels = probs.view(-1, probs.shape[-1])  # [n,Q]
            band_labels, band_confidence = labels[top:bottom].view(-1), confidence[top:bottom].view(-1)
            if bounds.due():
                classes = tile_candidates(class_major, probs, cols).any(0).nonzero()[:, 0]
                # A few classes: their columns only, one narrow product (2-3x faster than all 133
                # up to K = 64, measured).
                if bounds.paid(len(classes) <= num_classes // 2):
                    scores = pixels @ pad_columns(class_columns[:, torch.cat([classes, sum_column])])  # [n,K+1+]
                    _write_best(scores, classes, band_labels, band_confidence)
                    continue
            screen_now = screening.due()
            left = _score_band(pixels, band_labels, band_confidence, every_class, strong if screen_now else None)
            if screen_now:
                screening.paid(2 * left <= len(pixels))
    return SemanticPrediction(labels=labels, confidence=confidence)


def _score_band(
    pixels: Tensor, labels: Tensor, confidence: Tensor, every_class: _EveryClass, strong: ClassScreen | None
) -> int:
    """Every class of a band's ``pixels [n,Q]`` into ``labels [n]`` and ``confidence [n]``, in steps
    that stay in cache; with the ``strong`` classes' screen first, ``every_class`` only for the
    pixels it leaves. Returns how many it left (0 without a screen)."""
    left = 0
    for start in range(0, len(pixels), _SEMANTIC_CPU_STEP):
        step = slice(start, start + _SEMANTIC_CPU_STEP)
        if strong is None:
            every_class(pixels[step], labels[step], confidence[step])
            continue
        rest = screen(strong, pixels[step], labels[step], confidence[step])
        left += len(rest)
        if len(rest):
            rest_labels, rest_confidence = labels.new_empty(len(rest)), confidence.new_empty(len(rest))
            every_class(pixels[step][rest], rest_labels, rest_confidence)
            labels[step].index_copy_(0, rest, rest_labels)
            confidence[step].index_copy_(0, rest, rest_confidence)
    return left


class _Backoff:
    """Whether to try a shortcut that may not pay: after it fails, it is skipped the next 1, then 3,
    7, ... times it comes up; a success resets it. Wasted tries stay logarithmic in the bands."""

    def __init__(self) -> None:
        self._skips, self._failures = 0, 0

    def due(self) -> bool:
        if self._skips:
            self._skips -= 1
            return False
        return True

    def paid(self, success: bool) -> bool:
        """Records a try's outcome; returns ``success``."""
        self._failures = 0 if success else self._failures + 1
        self._skips = 2**self._failures - 1
        return success


class _EveryClass(NamedTuple):
    """Every class scored at each pixel, for one image: ``class_columns [Q,C+1+padding]`` and
    ``num_classes`` C (``_class_columns``), a ``buffer`` for the scores and the ``argmax`` that
    finds each row's best (``argmax(scores, out)``: ``RowArgmax`` on the CPU, torch's elsewhere)."""

    class_columns: Tensor
    num_classes: int
    buffer: Tensor
    argmax: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, pixels: Tensor, labels: Tensor, confidence: Tensor) -> None:
        """Scores ``pixels [n,Q]`` (mask probabilities; ``n`` at most the buffer's rows) into
        ``labels [n]`` and ``confidence [n]`` (contiguous): one product, pixel-major so that the
        best reduces along contiguous memory, then the best over all its columns (the sum's is
        <= 0 and the padding's 0: neither wins over a class)."""
        scores = torch.mm(pixels, self.class_columns, out=self.buffer[: pixels.shape[0]])
        self.argmax(scores, labels)
        confidence.copy_(class_share(scores.gather(1, labels[:, None])[:, 0], scores[:, self.num_classes].neg()))


def _torch_argmax(scores: Tensor, out: Tensor) -> Tensor:
    """``_EveryClass``'s argmax off the CPU: torch's, each row's first best column into ``out``."""
    return torch.argmax(scores, 1, out=out)


def _class_columns(class_logits: Tensor) -> Tensor:
    """``[Q,C+1+padding]``: the class probabilities of ``class_logits [Q,C+1]`` ("no object"
    dropped), then minus their sum per query, so that one product gives every class's score and
    a pixel's total (negated, so that it never wins a maximum over all columns); then zeros up to
    a multiple of ``class_screen.COLUMN_MULTIPLE`` columns, which win only where every class scores 0, after
    class 0."""
    class_probs = _class_probs(class_logits)
    return pad_columns(torch.cat([class_probs, class_probs.sum(1, keepdim=True).neg()], 1))


def _write_best(scores: Tensor, classes: Tensor, labels: Tensor, confidence: Tensor) -> None:
    """From ``scores [n,K+1+]`` (the ``K`` ``classes``, then minus their sum) into ``labels [n]`` and
    ``confidence [n]``: each pixel's first best class and its share of the sum."""
    best, winner = scores[:, : len(classes)].max(-1)
    labels.copy_(classes[winner])
    confidence.copy_(class_share(best, scores[:, len(classes)].neg()))


def tile_candidates(class_major: Tensor, probs: Tensor, tile_width: int) -> Tensor:
    """``[T,C]`` bool: the classes that may be the best at some pixel of each tile of a band.

    ``class_major [C,Q]`` class probabilities, ``probs [r,W,Q]`` the band's mask probabilities,
    pixel-major, cut into ``T`` tiles of ``tile_width`` columns (the last one narrower when
    ``W`` is not a multiple). In a tile every pixel's best score is at least two things: the
    best class's score with each mask probability at its minimum over the tile, and (all terms
    being non-negative) any single term, such as a query's mask probability there times its
    own top class probability. The larger of the two, less ``_PRUNE_MARGIN``, is the bar a
    class's upper bound (each mask probability at its maximum) must reach. The second bound is
    what holds at a boundary between two segments, where each query's minimum is near 0 but at
    every pixel one of them is near 1; it is taken over the ``_BOUNDING_QUERIES`` queries with
    the largest terms in the tile. All tiles at once: a few ops per band, not per tile.
    """
    width = probs.shape[1]
    tiles = -(-width // tile_width)
    tile_of_column = torch.arange(width, device=probs.device) // tile_width  # [W]
    # Reduce the rows one dim at a time (25x faster than two dims at once on this layout).
    highest = _per_tile(probs.amax(0), tiles, tile_width, torch.amax)  # [T,Q]
    lowest = _per_tile(probs.amin(0), tiles, tile_width, torch.amin)
    lower, upper = lowest @ class_major.t(), highest @ class_major.t()  # [T,C]
    # Any subset of queries gives a valid bound; the few that reach the largest terms hold it at
    # a boundary, and taking all Q would cost another pass over the band.
    top_class = class_major.amax(0)  # [Q]
    strongest = (top_class * highest).topk(min(_BOUNDING_QUERIES, len(top_class)), dim=1).indices  # [T,k]
    column_queries = strongest[tile_of_column].expand(probs.shape[0], -1, -1)  # [r,W,k]
    terms = probs.gather(2, column_queries) * top_class[column_queries]
    top_term = _per_tile(terms.amax(2).amin(0)[:, None], tiles, tile_width, torch.amin)[:, 0]  # [T]
    bar = torch.maximum(lower.amax(1), top_term) * (1 - _PRUNE_MARGIN)
    return upper >= bar[:, None]


def _per_tile(columns: Tensor, tiles: int, tile_width: int, reduce: Callable[..., Tensor]) -> Tensor:
    """``reduce`` (amax or amin) of ``columns [W,Q]`` over each tile's columns -> ``[T,Q]``; the last,
    narrower tile is filled out with copies of its last column, which change neither."""
    missing = tiles * tile_width - len(columns)
    if missing:
        columns = torch.cat([columns, columns[-1:].expand(missing, -1)])
    return reduce(columns.view(tiles, tile_width, -1), 1)


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class score maps ``[C,H,W]`` (``semantic_scores``) of mask logits at the image's size.

    Detectron2 resizes mask logits before the scores (as the pipeline does); HF's
    ``post_process_semantic_segmentation`` and mmseg (the pipeline's sliding windows) resize
    the scores instead.
    """
    return semantic_scores(class_logits, mask_logits)


def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    is_thing: Tensor,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    mask_threshold: float = 0.5,
) -> PanopticPrediction:
    """Non-overlapping segments from ``class_logits [Q,C+1]``, ``mask_logits [Q,H,W]``.

    ``is_thing [C]`` bool says which classes are countable. Detectron2's rules:
    1. keep queries whose most probable class is not "no object" and whose probability
       exceeds ``object_mask_threshold``;
    2. every pixel goes to the kept query maximising class probability x mask probability;
    3. a query's segment is the pixels it won where its own mask probability is
       >= ``mask_threshold``; it is dropped when it won no pixel, its own mask is empty, that
       segment is empty, or won area / own-mask area < ``overlap_threshold`` (mostly hidden);
    4. stuff queries of one class share one segment id; each thing query gets its own.

    Where HF's ``post_process_panoptic_segmentation`` differs (same logits, same size):
    - its defaults are ``threshold=0.5`` (object threshold) and no fusing; pass 0.8 and
      ``label_ids_to_fuse`` = the stuff classes to approach these rules;
    - a segment is every pixel the query won, without the mask-probability test of rule 3,
      so pixels no mask claims are still labelled rather than void (0);
    - the own-mask area of rule 3 is counted on class-weighted probabilities
      (score x prob >= 0.5), which is smaller, and the ratio must exceed the threshold
      strictly; it keeps some queries detectron2 drops, and drops one at exactly the threshold;
    - a query whose won pixels all fall below the mask threshold still becomes a segment there;
    - a fused stuff segment is listed once per contributing query (repeated ids, each with
      its own score); here it is one entry with the highest score and the summed area;
    - with ``target_sizes`` it resizes mask probabilities, not logits, and with no query kept
      it returns a map of -1 instead of an all-void (0) map.
    """
    num_classes = _num_classes(class_logits, mask_logits)
    if is_thing.shape != (num_classes,):
        raise ValueError(f"is_thing must have one flag per class ({num_classes}), got shape {tuple(is_thing.shape)}")
    queries, scores, labels = panoptic_queries(class_logits, object_mask_threshold)
    return panoptic_segments(scores, labels, mask_logits[queries], is_thing, overlap_threshold, mask_threshold)


def panoptic_queries(class_logits: Tensor, object_mask_threshold: float = 0.8) -> tuple[Tensor, Tensor, Tensor]:
    """Rule 1 of ``panoptic_inference``: the kept queries ``[K]`` (ascending), their class
    probabilities ``[K]`` and labels ``[K]``, from ``class_logits [Q,C+1]``.

    Only these queries' mask logits matter to the panoptic result, so a caller may bring just
    ``mask_logits[queries]`` to the image's size.
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    queries = keep.nonzero()[:, 0]
    return queries, scores[queries], labels[queries]


def panoptic_segments(
    scores: Tensor,
    labels: Tensor,
    mask_logits: Tensor,
    is_thing: Tensor,
    overlap_threshold: float = 0.8,
    mask_threshold: float = 0.5,
) -> PanopticPrediction:
    """Rules 2-4 of ``panoptic_inference`` over the kept queries of ``panoptic_queries``:
    ``scores [K]``, ``labels [K]``, ``mask_logits [K,H,W]`` (K may be 0), ``is_thing [C]``.
    """
    pixels = panoptic_pixels(scores, mask_logits, mask_threshold)
    return panoptic_prediction(scores, labels, pixels, is_thing, overlap_threshold)


class PanopticPixels(NamedTuple):
    """Rules 2-3 of ``panoptic_inference`` per pixel, for K kept queries: the winning query
    ``winner [H,W]`` int64, whether the pixel is in the winner's own mask ``in_mask [H,W]`` bool,
    and per query ``[K]`` int64 the pixels it won, its own-mask area and its segment's area."""

    winner: Tensor
    in_mask: Tensor
    won_area: Tensor
    own_area: Tensor
    segment_area: Tensor


def panoptic_pixels(scores: Tensor, mask_logits: Tensor, mask_threshold: float = 0.5) -> PanopticPixels:
    """The per-pixel part of ``panoptic_segments`` for ``scores [K]``, ``mask_logits [K,H,W]``, on
    their device and with no host sync (nothing in it waits for a GPU)."""
    num_kept, height, width = mask_logits.shape
    if num_kept == 0:
        none = mask_logits.new_zeros(0, dtype=torch.long)
        winner = mask_logits.new_zeros((height, width), dtype=torch.long)
        return PanopticPixels(winner, winner.bool(), none, none, none)
    winner, in_mask, own_area = _winning_queries(scores, mask_logits, mask_threshold)
    # One count of (winner, in its mask) pairs gives both the won and the segment areas; a
    # scatter, as ``bincount`` on a GPU reads its input's maximum back to the host.
    pairs = (winner + num_kept * in_mask).flatten()
    counts = torch.zeros(2 * num_kept, dtype=torch.long, device=pairs.device)
    counts.scatter_add_(0, pairs, torch.ones_like(pairs))
    won_area, segment_area = counts[:num_kept] + counts[num_kept:], counts[num_kept:]
    return PanopticPixels(winner, in_mask, won_area, own_area, segment_area)


def panoptic_prediction(
    scores: Tensor, labels: Tensor, pixels: PanopticPixels, is_thing: Tensor, overlap_threshold: float = 0.8
) -> PanopticPrediction:
    """Rule 3's filter and rule 4's ids over ``panoptic_pixels``' result, decided on the host
    (a handful of queries, and ids depend on earlier decisions): the segments and the id map.
    ``scores [K]``, ``labels [K]``, ``is_thing [C]``; the map is on ``pixels``' device."""
    panoptic_seg = torch.zeros(pixels.winner.shape, dtype=torch.int32, device=pixels.winner.device)
    if len(scores) == 0:
        return PanopticPrediction(panoptic_seg, [])
    segments: list[Segment] = []
    stuff_segments: dict[int, Segment] = {}
    segment_of_query = [0] * len(scores)
    thing_flags = is_thing.tolist()
    stats = torch.stack([pixels.won_area, pixels.own_area, pixels.segment_area]).tolist()
    for k, (label, score, won, own, area) in enumerate(zip(labels.tolist(), scores.tolist(), *stats)):
        if won == 0 or own == 0 or area == 0 or won / own < overlap_threshold:
            continue
        isthing = bool(thing_flags[label])
        segment = None if isthing else stuff_segments.get(label)
        if segment is None:
            segment = Segment(id=len(segments) + 1, label=label, isthing=isthing, score=score, area=0)
            segments.append(segment)
            if not isthing:
                stuff_segments[label] = segment
        segment["score"] = max(segment["score"], score)
        segment["area"] += area
        segment_of_query[k] = segment["id"]

    segment_ids = torch.tensor(segment_of_query, dtype=torch.int32, device=panoptic_seg.device)
    panoptic_seg = torch.where(pixels.in_mask, segment_ids[pixels.winner], panoptic_seg)
    return PanopticPrediction(panoptic_seg, segments)


# Pixels per step of ``_winning_queries``: K rows of this many floats stay in the CPU's cache,
# and there are few enough steps (8 for 800 x 1216) that a loaded machine, where every
# parallel op waits for its slowest thread, does not pay a stall on hundreds of small ops.
_PIXEL_CHUNK = 131072


def _winning_queries(scores: Tensor, mask_logits: Tensor, mask_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Rules 2-3 per pixel for ``scores [K]``, ``mask_logits [K,H,W]`` (K >= 1): the winning query
    ``[H,W]`` int64 (argmax of score x mask probability, first on ties), whether the pixel is in
    the winner's mask ``[H,W]`` bool, and each query's own-mask area ``[K]`` int64.

    Runs over chunks of pixels so that the K-row temporaries stay in cache; each pixel's values
    are computed exactly as over the whole image. ``argmax`` over a leading dimension is not
    vectorised on CPU but ``amax`` is: the rows equal to the maximum are ranked ``K - k``
    (uint8), and the largest rank is the first such row, ``argmax``'s tie rule.
    """
    num_kept, height, width = mask_logits.shape
    flat = mask_logits.reshape(num_kept, height * width)
    device = mask_logits.device
    winner = torch.empty(height * width, dtype=torch.long, device=device)
    in_mask = torch.empty(height * width, dtype=torch.bool, device=device)
    own_area = torch.zeros(num_kept, dtype=torch.long, device=device)
    row_scores = scores[:, None]
    rank = torch.arange(num_kept, 0, -1, dtype=torch.uint8 if num_kept < 256 else torch.long, device=device)[:, None]
    chunk = _PIXEL_CHUNK if device.type == "cpu" else height * width
    for start in range(0, height * width, chunk):
        probs = flat[:, start : start + chunk].sigmoid()
        weighted = probs * row_scores
        first = num_kept - ((weighted == weighted.amax(0)) * rank).amax(0).long()
        winner[start : start + chunk] = first
        in_mask[start : start + chunk] = probs.gather(0, first[None])[0] >= mask_threshold
        own_area += (probs >= mask_threshold).sum(1)
    return winner.view(height, width), in_mask.view(height, width), own_area


def instance_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    top_k: int = 100,
    is_thing: Tensor | None = None,
    mask_threshold: float = 0.5,
) -> InstancePrediction:
    """Up to ``top_k`` scored instances from ``class_logits [Q,C+1]``, ``mask_logits [Q,H,W]``.

    Candidates are the ``top_k`` best (query, class) pairs by class probability ("no object"
    excluded), so one query may appear under several classes. Given ``is_thing [C]`` (a
    panoptic model), candidates of stuff classes are then removed, as detectron2 does after
    the top-k, so fewer than ``top_k`` may remain. A mask is mask probability >
    ``mask_threshold``; the score is class probability x mean mask probability inside the mask
    (0 for an empty mask). Boxes enclose the masks. Sorted by descending score.
    """
    _num_classes(class_logits, mask_logits)
    if not 0.0 < mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
    class_scores, labels, queries = instance_candidates(class_logits, top_k, is_thing)
    unique, inverse = torch.unique(queries, return_inverse=True)
    return instance_masks(class_scores, labels, inverse, mask_logits[unique], mask_threshold)


def instance_candidates(
    class_logits: Tensor, top_k: int = 100, is_thing: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The candidates of ``instance_inference`` from ``class_logits [Q,C+1]``: class
    probabilities ``[N]`` (descending), labels ``[N]`` and queries ``[N]`` of the ``top_k`` best
    (query, class) pairs, less those of stuff classes when ``is_thing [C]`` is given.

    A candidate's final score is its class probability times a mean mask probability (at most
    1), so a caller applying a score threshold may drop candidates below it here, before any
    mask is resized.
    """
    if class_logits.dim() != 2 or class_logits.shape[1] < 2:
        raise ValueError(f"class_logits must be [Q,C+1] with C >= 1, got shape {tuple(class_logits.shape)}")
    num_classes = class_logits.shape[1] - 1
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if is_thing is not None and is_thing.shape != (num_classes,):
        raise ValueError(f"is_thing must have one flag per class ({num_classes}), got shape {tuple(is_thing.shape)}")
    class_probs = _class_probs(class_logits).flatten()
    class_scores, pair = class_probs.topk(min(top_k, class_probs.numel()))
    labels, queries = pair % num_classes, pair // num_classes
    if is_thing is not None:
        thing = is_thing.to(labels.device)[labels]
        class_scores, labels, queries = class_scores[thing], labels[thing], queries[thing]
    return class_scores, labels, queries


def instance_masks(
    class_scores: Tensor, labels: Tensor, inverse: Tensor, mask_logits: Tensor, mask_threshold: float = 0.5
) -> InstancePrediction:
    """Masks, scores and boxes of ``instance_inference``'s candidates, sorted by descending score.

    ``class_scores [N]``, ``labels [N]``: the candidates; ``mask_logits [U,H,W]``: the distinct
    queries they use, candidate ``n`` reading row ``inverse[n]``. Each query's mask, mean mask
    probability and box are computed once, however many candidates share it.
    """
    return instance_prediction(class_scores, labels, inverse, instance_query_masks(mask_logits, mask_threshold))


class QueryMasks(NamedTuple):
    """Per distinct query: ``masks [U,H,W]`` bool, mean mask probability inside the mask
    ``mask_scores [U]`` (0 for an empty mask) and ``boxes [U,4]``."""

    masks: Tensor
    mask_scores: Tensor
    boxes: Tensor


def instance_query_masks(mask_logits: Tensor, mask_threshold: float = 0.5) -> QueryMasks:
    """The per-pixel part of ``instance_masks`` for ``mask_logits [U,H,W]``, on their device and
    with no host sync."""
    # Thresholding logits, not probabilities, keeps tiny positive logits (whose float32
    # sigmoid rounds to exactly 0.5) inside the mask, as detectron2's ``logits > 0`` does.
    masks = mask_logits > math.log(mask_threshold / (1.0 - mask_threshold))
    inside = masks.flatten(1)
    mask_scores = (mask_logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + _EMPTY_MASK_EPS)
    return QueryMasks(masks, mask_scores, mask_boxes(masks))


def instance_prediction(
    class_scores: Tensor, labels: Tensor, inverse: Tensor, queries: QueryMasks
) -> InstancePrediction:
    """Candidates ``class_scores [N]``, ``labels [N]`` reading ``queries`` row ``inverse[n]``:
    scored (class probability x mean mask probability) and sorted by descending score."""
    scores = class_scores * queries.mask_scores[inverse]
    order = scores.argsort(descending=True, stable=True)
    rows = inverse[order]
    return InstancePrediction(
        masks=queries.masks[rows], labels=labels[order], scores=scores[order], boxes=queries.boxes[rows]
    )


def _num_classes(class_logits: Tensor, mask_logits: Tensor) -> int:
    """C, after checking ``class_logits [Q,C+1]`` and ``mask_logits [Q,H,W]`` agree."""
    if class_logits.dim() != 2 or class_logits.shape[1] < 2:
        raise ValueError(f"class_logits must be [Q,C+1] with C >= 1, got shape {tuple(class_logits.shape)}")
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [Q,H,W], got shape {tuple(mask_logits.shape)}")
    if class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"class_logits has {class_logits.shape[0]} queries but mask_logits has {mask_logits.shape[0]}"
        )
    return class_logits.shape[1] - 1


def _size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"a size must be (height, width), got {size!r}")
    return int(size[0]), int(size[1])
