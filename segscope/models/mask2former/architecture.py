"""Mask2Former in the architecture registry: build, post-process, checkpoint formats."""

from __future__ import annotations

import torch
from torch import Tensor

from segscope.config import Mask2FormerConfig, SwinConfig, mask2former_config_from_dict
from segscope.models.mask2former import postprocess
from segscope.models.mask2former.model import Mask2Former, Mask2FormerOutput
from segscope.predictions import ImageSizes, Prediction, SemanticPrediction
from segscope.registry import Architecture, FileFormat, register


def _postprocess(
    config: Mask2FormerConfig,
    outputs: Mask2FormerOutput,
    index: int,
    sizes: ImageSizes,
    task: str,
    threshold: float | None,
    is_thing: Tensor,
) -> Prediction:
    """Detectron2's inference for ``task`` on image ``index``, at its original size.

    Only the queries the inference can use are resized to the original size (resizing is per
    query, so the result is the same as resizing all of them): panoptic, those passing the
    object-mask threshold; instance, the distinct queries of the top-k candidates whose class
    probability reaches ``threshold`` (a final score never exceeds it, so the others could
    not pass the pipeline's threshold and are left out of the prediction); semantic, all.
    """
    mask_logits = outputs.mask_logits[index]
    class_logits = outputs.class_logits[index].float()

    def to_image(queries: Tensor | None) -> Tensor:
        """``mask_logits[queries]`` ``[K,h,w]`` -> ``[K,H0,W0]`` float (all queries if None)."""
        logits = mask_logits if queries is None else mask_logits[queries]
        return postprocess.mask_logits_to_image(logits, sizes.padded, sizes.resized, sizes.original).float()

    if task == "panoptic":
        queries, scores, labels = postprocess.panoptic_queries(class_logits, threshold)
        return postprocess.panoptic_segments(scores, labels, to_image(queries), is_thing, config.overlap_threshold)
    if task == "semantic":
        # Detectron2's order: resize the mask logits, then score the classes.
        return _semantic_prediction(class_logits, to_image(None), mask_logits)
    # A panoptic model's instances are its things; a model of things only keeps them all.
    things = is_thing if not bool(is_thing.all()) else None
    class_scores, labels, queries = postprocess.instance_candidates(class_logits, config.test_topk_per_image, things)
    if threshold is not None:
        reachable = class_scores >= threshold
        class_scores, labels, queries = class_scores[reachable], labels[reachable], queries[reachable]
    unique, inverse = torch.unique(queries, return_inverse=True)
    return postprocess.instance_masks(class_scores, labels, inverse, to_image(unique))


def _semantic_prediction(class_logits: Tensor, image_logits: Tensor, network_logits: Tensor) -> SemanticPrediction:
    """The semantic prediction of ``image_logits [Q,H0,W0]``, taking their sigmoid in place when
    they are a fresh tensor rather than the network's ``network_logits [Q,h,w]`` themselves."""
    fresh = image_logits.untyped_storage().data_ptr() != network_logits.untyped_storage().data_ptr()
    return postprocess.semantic_prediction(class_logits, image_logits, in_place=fresh)


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
