"""Mask2Former in the architecture registry: build, post-process, checkpoint formats."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from segscope.config import Mask2FormerConfig, SwinConfig, mask2former_config_from_dict
from segscope.devices import to_device, to_host
from segscope.models.mask2former import postprocess
from segscope.models.mask2former.model import Mask2Former, Mask2FormerOutput
from segscope.predictions import ImageSizes, Prediction, SemanticPrediction
from segscope.registry import Architecture, FileFormat, register


def _postprocess(
    config: Mask2FormerConfig,
    outputs: Mask2FormerOutput,
    sizes: Sequence[ImageSizes],
    task: str,
    threshold: float | None,
    is_thing: Tensor,
) -> list[Prediction]:
    """Detectron2's inference for ``task`` on each image of the batch, at its original size, on the CPU.

    Per-query decisions (which queries, their classes and scores, which become segments) are
    taken on the host; per-pixel work runs on the outputs' device for every image and reaches
    the host in one copy, so a GPU batch waits for the device twice, not per image or segment.
    Only the queries the inference can use are resized to the original size (resizing is per
    query, so the result is the same as resizing all of them): panoptic, those passing the
    object-mask threshold; instance, the distinct queries of the top-k candidates whose class
    probability reaches ``threshold`` (a final score never exceeds it, so the others could
    not pass the pipeline's threshold and are left out of the prediction); semantic, all.
    """
    if task == "semantic":
        return _semantic(outputs, sizes)
    class_logits = outputs.class_logits.float().cpu()  # [B,Q,C+1], one copy for the batch's decisions
    if task == "panoptic":
        return _panoptic(config, class_logits, outputs.mask_logits, sizes, threshold, is_thing.cpu())
    return _instance(config, class_logits, outputs.mask_logits, sizes, threshold, is_thing.cpu())


def _panoptic(
    config: Mask2FormerConfig,
    class_logits: Tensor,
    mask_logits: Tensor,
    sizes: Sequence[ImageSizes],
    threshold: float | None,
    is_thing: Tensor,
) -> list[Prediction]:
    kept = [postprocess.panoptic_queries(logits, threshold) for logits in class_logits]
    pixels = [
        postprocess.panoptic_pixels(to_device(scores, masks.device), _to_image(masks, size, queries))
        for (queries, scores, _), masks, size in zip(kept, mask_logits, sizes)
    ]
    return [
        postprocess.panoptic_prediction(scores, labels, image_pixels, is_thing, config.overlap_threshold)
        for (_, scores, labels), image_pixels in zip(kept, to_host(pixels))
    ]


def _semantic(outputs: Mask2FormerOutput, sizes: Sequence[ImageSizes]) -> list[Prediction]:
    # Detectron2's order: resize the mask logits, then score the classes.
    predictions = [
        postprocess.semantic_from_outputs(classes.float(), masks, size.padded, size.resized, size.original)
        for classes, masks, size in zip(outputs.class_logits, outputs.mask_logits, sizes)
    ]
    host = to_host([(prediction.labels, prediction.confidence) for prediction in predictions])
    return [SemanticPrediction(labels, confidence) for labels, confidence in host]


def _instance(
    config: Mask2FormerConfig,
    class_logits: Tensor,
    mask_logits: Tensor,
    sizes: Sequence[ImageSizes],
    threshold: float | None,
    is_thing: Tensor,
) -> list[Prediction]:
    # A panoptic model's instances are its things; a model of things only keeps them all.
    things = is_thing if not bool(is_thing.all()) else None
    candidates = []
    for logits in class_logits:
        class_scores, labels, queries = postprocess.instance_candidates(logits, config.test_topk_per_image, things)
        if threshold is not None:
            reachable = class_scores >= threshold
            class_scores, labels, queries = class_scores[reachable], labels[reachable], queries[reachable]
        unique, inverse = torch.unique(queries, return_inverse=True)
        candidates.append((class_scores, labels, inverse, unique))
    query_masks = [
        postprocess.instance_query_masks(_to_image(masks, size, unique))
        for (*_, unique), masks, size in zip(candidates, mask_logits, sizes)
    ]
    return [
        postprocess.instance_prediction(class_scores, labels, inverse, image_masks)
        for (class_scores, labels, inverse, _), image_masks in zip(candidates, to_host(query_masks))
    ]


def _to_image(mask_logits: Tensor, sizes: ImageSizes, queries: Tensor | None) -> Tensor:
    """One image's ``mask_logits [Q,h,w]`` (rows ``queries`` of them, host indices; all if None)
    -> ``[K,H0,W0]`` float at its original size."""
    if queries is not None:
        mask_logits = mask_logits.index_select(0, to_device(queries, mask_logits.device))
    return postprocess.mask_logits_to_image(mask_logits, sizes.padded, sizes.resized, sizes.original).float()


def _default_threshold(config: Mask2FormerConfig, task: str) -> float | None:
    return {"panoptic": config.object_mask_threshold, "instance": 0.5}.get(task)


def _window_scores(outputs: Mask2FormerOutput) -> Tensor:
    """``[B,C,h,w]`` semantic scores at the mask logits' stride-4 resolution."""
    return torch.stack(
        [
            postprocess.semantic_scores(classes.float(), masks.float())
            for classes, masks in zip(outputs.class_logits, outputs.mask_logits)
        ]
    )


def _detectron2() -> FileFormat:
    from segscope.checkpoints.detectron2 import convert_detectron2_mask2former, read_detectron2_pickle

    return read_detectron2_pickle, lambda state_dict, model: convert_detectron2_mask2former(state_dict)


def _mmlab(fmt: str):
    def formats() -> FileFormat:
        from segscope.checkpoints.mmlab import MMLAB_CONVERTERS, read_mmlab_checkpoint

        return read_mmlab_checkpoint, MMLAB_CONVERTERS[fmt]

    return formats


def _example_config(num_classes: int) -> Mask2FormerConfig:
    """A Mask2Former of about a million parameters (Swin of width 16, 64-wide head)."""
    return Mask2FormerConfig(
        backbone=SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4),
        num_classes=num_classes,
        pixel_decoder_dim=32,
        mask_dim=32,
        pixel_decoder_layers=1,
        pixel_decoder_ffn_dim=64,
        pixel_decoder_heads=4,
        hidden_dim=32,
        num_queries=10,
        decoder_layers=2,
        decoder_heads=4,
        decoder_ffn_dim=64,
        train_num_points=256,
    )


MASK2FORMER = register(
    Architecture(
        name="mask2former",
        config_class=Mask2FormerConfig,
        config_from_dict=mask2former_config_from_dict,
        build=Mask2Former,
        tasks=("panoptic", "semantic", "instance"),
        postprocess=_postprocess,
        default_threshold=_default_threshold,
        window_scores=_window_scores,
        file_formats={
            "detectron2": _detectron2,
            "mmseg0": _mmlab("mmseg0"),
            "mmseg1": _mmlab("mmseg1"),
            "mmdet2": _mmlab("mmdet2"),
            "mmdet3": _mmlab("mmdet3"),
        },
        example_config=_example_config,
        export_outputs=lambda outputs: {"class_logits": outputs.class_logits, "mask_logits": outputs.mask_logits},
    )
)
