"""The inference pipeline: load image -> preprocess -> model -> post-process -> result.

Device, dtype and batching are decided here and nowhere deeper.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from segscope.devices import resolve_device
from segscope.errors import ImageLoadError, ModelOutputError, OptionError
from segscope.io import list_images, load_image
from segscope.loading import LoadedModel, load
from segscope.predictions import ImageSizes, InstancePrediction, PanopticPrediction
from segscope.registry import architecture_of
from segscope.results import SegmentationResult
from segscope.transforms import Preprocessor, sliding_windows

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
TASKS = ("panoptic", "semantic", "instance")


class SegmentationPipeline:
    """Segment images with a loaded model.

    Args:
        model: a ``LoadedModel`` (see ``segscope.loading.load``).
        task: "panoptic", "semantic" or "instance"; defaults to the model's own task.
        device: "cpu", "cuda", ...; defaults to CUDA when available.
        batch_size: images per forward pass when given a list or a folder.
        threshold: the lowest score a segment may have. Instance task: instances scoring below
            it are dropped (default 0.5). Panoptic task: the object-mask threshold of the
            post-processing, queries scoring at or below it take no pixels (default: the
            model's own, 0.8 for the published models). The semantic task keeps every pixel's
            winning class and refuses a threshold.

    The semantic task of a model whose preprocessing sets a ``window`` runs by sliding windows
    (``sliding_semantic_scores``; ``batch_size`` windows per forward pass); the other tasks
    always see the whole image.
    """

    def __init__(
        self,
        model: LoadedModel,
        task: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 1,
        threshold: float | None = None,
    ) -> None:
        task = task or model.description.default_task
        if task not in TASKS:
            raise OptionError(f"unknown task {task!r}; expected one of {TASKS}")
        self.architecture = architecture_of(model.description.config)
        if task not in self.architecture.tasks:
            raise OptionError(
                f"{model.name} ({self.architecture.name}) serves the {', '.join(self.architecture.tasks)} "
                f"task(s), not {task!r}"
            )
        if batch_size < 1:
            raise OptionError(f"batch_size must be >= 1, got {batch_size}")
        preprocess = model.description.preprocess
        if task == "semantic" and preprocess.window > 0 and self.architecture.window_scores is None:
            raise OptionError(f"{self.architecture.name} cannot run the sliding windows its preprocessing asks for")
        self.model = model
        self.task = task
        self.device = resolve_device(device)
        self.batch_size = batch_size
        default_threshold = self.architecture.default_threshold(model.description.config, task)
        self.threshold = _task_threshold(task, threshold, default_threshold)
        self.categories = model.description.categories
        self.preprocessor = Preprocessor(preprocess)
        self.module = model.module.to(self.device).eval()
        self._is_thing = torch.tensor([c.isthing for c in self.categories.categories], dtype=torch.bool)

    def __call__(
        self, inputs: ImageInput | Sequence[ImageInput], *, progress: bool = False
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image (returns a result) or a list / folder of images (returns a list)."""
        if _is_folder(inputs):
            inputs = list_images(Path(inputs))
        elif not isinstance(inputs, (list, tuple)):
            return self._run_batch([load_image(inputs)])[0]
        return list(self.iter_results(inputs, progress=progress))

    def iter_results(self, inputs: Sequence[ImageInput], progress: bool = True) -> Iterator[SegmentationResult]:
        """Segment ``inputs`` batch by batch, yielding one result per image as it is ready.

        The first image that cannot be read raises its ``ImageLoadError``.
        """
        for _, outcome in self.iter_outcomes(inputs, progress=progress):
            if isinstance(outcome, ImageLoadError):
                raise outcome
            yield outcome

    def iter_outcomes(
        self, inputs: Sequence[ImageInput], progress: bool = True
    ) -> Iterator[tuple[int, SegmentationResult | ImageLoadError]]:
        """Like ``iter_results``, but an image that cannot be read does not stop the run: yields
        ``(index into inputs, result)``, or ``(index, the ImageLoadError)`` for an unreadable one."""
        with tqdm(total=len(inputs), disable=not progress, unit="img") as bar:
            for start in range(0, len(inputs), self.batch_size):
                loaded: list[tuple[int, np.ndarray]] = []
                for index in range(start, min(start + self.batch_size, len(inputs))):
                    try:
                        loaded.append((index, load_image(inputs[index])))
                    except ImageLoadError as error:
                        bar.update()
                        yield index, error
                results = self._run_batch([image for _, image in loaded]) if loaded else []
                for (index, _), result in zip(loaded, results):
                    bar.update()
                    yield index, result

    @torch.inference_mode()
    def _run_batch(self, images: list[np.ndarray]) -> list[SegmentationResult]:
        if self.task == "semantic" and self.model.description.preprocess.window > 0:
            return [self._semantic_result(image, self.sliding_semantic_scores(image)) for image in images]
        batch = self.preprocessor(images, device=self.device)
        outputs = self.module(batch.images)
        self._check_finite(outputs)
        padded_size = tuple(batch.images.shape[-2:])
        config = self.model.description.config
        is_thing = self._is_thing.to(self.device)
        results = []
        for i, image in enumerate(images):
            sizes = ImageSizes(padded_size, batch.image_sizes[i], batch.original_sizes[i])
            prediction = self.architecture.postprocess(config, outputs, i, sizes, self.task, self.threshold, is_thing)
            results.append(self._result(image, prediction))
        return results

    @torch.inference_mode()
    def sliding_semantic_scores(self, image: np.ndarray) -> torch.Tensor:
        """Class scores ``[C,H0,W0]`` of one HxWx3 uint8 ``image`` by mmseg's sliding-window inference.

        The window scores are averaged where windows overlap, at the resized size, then
        bilinearly resized to the original size (mmseg's ``slide_inference``).
        """
        summed, count = self._window_scores(self.preprocessor.prepare(image, self.device))
        averaged = (summed / count)[None]
        return F.interpolate(averaged, size=image.shape[:2], mode="bilinear", align_corners=False)[0]

    def _window_scores(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed window scores ``[C,H,W]`` and count of covering windows ``[H,W]`` over ``pixels [3,H,W]``.

        The crops go through the model ``batch_size`` at a time, zero-padded at the bottom and
        right to the size divisibility; each crop's scores (``semantic_scores`` at the output
        stride) are bilinearly resized to the padded crop size and cut back to the crop.
        """
        preprocess = self.model.description.preprocess
        height, width = pixels.shape[-2:]
        windows = sliding_windows(height, width, preprocess.window, preprocess.window_stride)
        summed = pixels.new_zeros((self.model.description.config.num_classes, height, width))
        count = pixels.new_zeros((height, width))
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            crops = self.preprocessor.pad([pixels[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
            outputs = self.module(crops)
            self._check_finite(outputs)
            window_scores = self.architecture.window_scores(outputs)
            for (y0, x0, y1, x1), scores in zip(chunk, window_scores):
                scores = F.interpolate(scores[None], size=crops.shape[-2:], mode="bilinear", align_corners=False)[0]
                summed[:, y0:y1, x0:x1] += scores[:, : y1 - y0, : x1 - x0]
                count[y0:y1, x0:x1] += 1
        return summed, count

    def _check_finite(self, outputs: Any) -> None:
        """Refuse NaN or infinite raw outputs rather than turn them into plausible-looking masks."""
        bad = [name for name, tensor in _named_tensors(outputs) if not bool(torch.isfinite(tensor).all())]
        if bad:
            raise ModelOutputError(
                f"{self.model.name} produced NaN or infinite values in {', '.join(bad[:3])}: its weights are "
                f"broken, or the values overflow {next(self.module.parameters()).dtype}"
            )

    def _result(self, image: np.ndarray, prediction: Any) -> SegmentationResult:
        if self.task == "panoptic":
            return self._panoptic_result(image, prediction)
        if self.task == "semantic":
            return self._semantic_result(image, prediction)
        return self._instance_result(image, prediction)

    def _panoptic_result(self, image: np.ndarray, prediction: PanopticPrediction) -> SegmentationResult:
        seg = prediction.panoptic_seg.cpu().numpy()
        infos = []
        for segment in prediction.segments:
            category = self.categories.categories[segment["label"]]
            infos.append(
                {
                    "id": int(segment["id"]),
                    "label": category.name,
                    "label_id": int(segment["label"]),
                    "category_id": category.id,
                    "isthing": bool(segment["isthing"]),
                    "score": float(segment["score"]),
                    "area": int(segment["area"]),
                }
            )
        ids = np.array([info["id"] for info in infos], dtype=seg.dtype)
        masks = seg[None] == ids[:, None, None] if infos else _no_masks(seg.shape)
        return SegmentationResult(
            task="panoptic",
            image=image,
            masks=masks,
            labels=[info["label"] for info in infos],
            label_ids=np.array([info["label_id"] for info in infos], dtype=np.int64),
            scores=np.array([info["score"] for info in infos], dtype=np.float32),
            categories=self.categories,
            panoptic_seg=seg,
            segments_info=infos,
        )

    def _semantic_result(self, image: np.ndarray, scores: torch.Tensor) -> SegmentationResult:
        """Per-pixel argmax; a class's score is its mean share of the pixel score where it wins."""
        share = scores / scores.sum(0, keepdim=True).clamp_min(1e-12)
        confidence, seg = share.max(0)
        present = torch.unique(seg)
        label_ids = present.cpu().numpy()
        masks = (seg[None] == present[:, None, None]).cpu().numpy()
        class_scores = np.array([float(confidence[seg == c].mean()) for c in present], dtype=np.float32)
        return SegmentationResult(
            task="semantic",
            image=image,
            masks=masks,
            labels=[self.categories.categories[i].name for i in label_ids],
            label_ids=label_ids.astype(np.int64),
            scores=class_scores,
            categories=self.categories,
            semantic_seg=seg.cpu().numpy().astype(np.int64, copy=False),
        )

    def _instance_result(self, image: np.ndarray, prediction: InstancePrediction) -> SegmentationResult:
        keep = prediction.scores >= self.threshold
        label_ids = prediction.labels[keep].cpu().numpy().astype(np.int64)
        # The masks are the largest output: not copied when every instance is kept.
        masks = prediction.masks if bool(keep.all()) else prediction.masks[keep]
        return SegmentationResult(
            task="instance",
            image=image,
            masks=masks.cpu().numpy(),
            labels=[self.categories.categories[i].name for i in label_ids],
            label_ids=label_ids,
            scores=prediction.scores[keep].cpu().numpy().astype(np.float32),
            categories=self.categories,
            boxes=prediction.boxes[keep].cpu().numpy().astype(np.float32),
        )


def pipeline(
    task_name: str = "image-segmentation",
    model: str | os.PathLike[str] | LoadedModel = "demo",
    task: str | None = None,
    **options: Any,
) -> SegmentationPipeline:
    """Build a segmentation pipeline, ``transformers.pipeline`` style.

    ``model`` is a zoo name, a Hub id, a local transformers directory, a segscope checkpoint
    or an already loaded model; ``options`` go to ``SegmentationPipeline``.
    """
    if task_name != "image-segmentation":
        raise OptionError(f"unsupported pipeline {task_name!r}; segscope provides 'image-segmentation'")
    loaded = model if isinstance(model, LoadedModel) else load(model)
    return SegmentationPipeline(loaded, task=task, **options)


def _task_threshold(task: str, threshold: float | None, default: float | None) -> float | None:
    """The score threshold the task applies (see ``SegmentationPipeline``): the user's, checked,
    or the architecture's ``default`` for the task."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise OptionError(f"threshold must lie in [0, 1] (it is a score), got {threshold}")
    if task == "semantic":
        if threshold is not None:
            raise OptionError(
                "the semantic task assigns every pixel its best class and has no score threshold; "
                "leave threshold unset (it applies to the panoptic and instance tasks)"
            )
        return None
    return threshold if threshold is not None else default


def _is_folder(inputs: Any) -> bool:
    return isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir()


def _no_masks(shape: tuple[int, int]) -> np.ndarray:
    return np.zeros((0, *shape), dtype=bool)


def _named_tensors(outputs: Any, prefix: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """The floating-point tensors of a model's raw outputs (a tensor, dataclass, dict or sequence)."""
    if isinstance(outputs, torch.Tensor):
        if outputs.is_floating_point():
            yield prefix, outputs
    elif dataclasses.is_dataclass(outputs):
        for field in dataclasses.fields(outputs):
            yield from _named_tensors(getattr(outputs, field.name), field.name)
    elif isinstance(outputs, dict):
        for key, value in outputs.items():
            yield from _named_tensors(value, str(key))
    elif isinstance(outputs, (list, tuple)):
        for index, value in enumerate(outputs):
            yield from _named_tensors(value, f"{prefix}[{index}]")

