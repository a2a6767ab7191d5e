"""Mask2Former's three inferences over one image's class and mask logits.

All three read the same two outputs of the last decoder layer: ``class_logits [Q,C+1]`` (the
last column is "no object") and ``mask_logits [Q,H,W]``, already brought to the image's
original size by ``mask_logits_to_image``. They follow detectron2's Mask2Former test-time
rules (``maskformer_model.py``: semantic, panoptic and instance inference); the defaults are
its test settings. Batching is the caller's loop; every function works on the inputs' device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from segscope.models.ops.boxes import mask_boxes
from segscope.predictions import InstancePrediction, PanopticPrediction, Segment

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
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [Q,h,w], got shape {tuple(mask_logits.shape)}")
    padded_size, image_size, original_size = (_size(s) for s in (padded_size, image_size, original_size))
    if not all(0 < i <= p for i, p in zip(image_size, padded_size)):
        raise ValueError(f"image_size {image_size} must be positive and fit in padded_size {padded_size}")
    if min(original_size) <= 0:
        raise ValueError(f"original_size must be positive, got {original_size}")
    padded = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
    image = padded[..., : image_size[0], : image_size[1]]
    return F.interpolate(image, size=original_size, mode="bilinear", align_corners=False)[0]


def semantic_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-class score maps ``[C,h,w]`` of ``class_logits [Q,C+1]``, ``mask_logits [Q,h,w]`` at any size.

    Over queries, the sum of class probability x mask probability; class probabilities are the
    softmax over ``C+1`` with "no object" then dropped, so a pixel's scores need not sum to 1.
    """
    _num_classes(class_logits, mask_logits)
    class_probs = class_logits.softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", class_probs, mask_logits.sigmoid())


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
    height, width = mask_logits.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device)

    scores, labels = class_logits.softmax(-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    if not bool(keep.any()):
        return PanopticPrediction(panoptic_seg, [])
    scores, labels, mask_probs = scores[keep], labels[keep], mask_logits[keep].sigmoid()

    num_kept = mask_probs.shape[0]
    winner = (scores[:, None, None] * mask_probs).argmax(0)
    in_mask = mask_probs.gather(0, winner[None])[0] >= mask_threshold
    won_area = torch.bincount(winner.flatten(), minlength=num_kept)
    own_area = (mask_probs >= mask_threshold).flatten(1).sum(1)
    segment_area = torch.bincount(winner[in_mask], minlength=num_kept)

    # Decided on the host: a handful of queries, and ids depend on earlier decisions.
    segments: list[Segment] = []
    stuff_segments: dict[int, Segment] = {}
    segment_of_query = [0] * num_kept
    thing_flags = is_thing.tolist()
    for k, (label, score, won, own, area) in enumerate(
        zip(labels.tolist(), scores.tolist(), won_area.tolist(), own_area.tolist(), segment_area.tolist())
    ):
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

    segment_ids = torch.tensor(segment_of_query, dtype=torch.int32, device=mask_logits.device)
    panoptic_seg = torch.where(in_mask, segment_ids[winner], panoptic_seg)
    return PanopticPrediction(panoptic_seg, segments)


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
    num_classes = _num_classes(class_logits, mask_logits)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not 0.0 < mask_threshold < 1.0:
        raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
    if is_thing is not None and is_thing.shape != (num_classes,):
        raise ValueError(f"is_thing must have one flag per class ({num_classes}), got shape {tuple(is_thing.shape)}")

    class_probs = class_logits.softmax(-1)[:, :-1].flatten()
    class_scores, pair = class_probs.topk(min(top_k, class_probs.numel()))
    labels, queries = pair % num_classes, pair // num_classes
    if is_thing is not None:
        thing = is_thing.to(labels.device)[labels]
        class_scores, labels, queries = class_scores[thing], labels[thing], queries[thing]

    logits = mask_logits[queries]
    # Thresholding logits, not probabilities, keeps tiny positive logits (whose float32
    # sigmoid rounds to exactly 0.5) inside the mask, as detectron2's ``logits > 0`` does.
    masks = logits > math.log(mask_threshold / (1.0 - mask_threshold))
    inside = masks.flatten(1)
    mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + _EMPTY_MASK_EPS)
    scores = class_scores * mask_scores

    order = scores.argsort(descending=True, stable=True)
    masks = masks[order]
    return InstancePrediction(masks=masks, labels=labels[order], scores=scores[order], boxes=mask_boxes(masks))


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
