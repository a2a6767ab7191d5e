"""The inference pipeline: load image -> preprocess -> model -> post-process -> result.

Device, dtype and batching are decided here and nowhere deeper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from segscope.predictions import ImageSizes, InstancePrediction, PanopticPrediction, SemanticPrediction
from segscope.registry import architecture_of
from segscope.results import SegmentationResult
from segscope.transforms import Batch, Preprocessor, sliding_windows

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
TASKS = ("panoptic", "semantic", "instance")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The name of the thread that loads and preprocesses the next batch (see ``iter_outcomes``).
LOADER_THREAD_NAME = "segscope-loader"


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
        dtype: "float32" (default), "bfloat16" or "float16": the network runs under
            ``torch.autocast`` in this dtype (float16 on CUDA only; bfloat16 also on the CPU);
            the weights stay float32 and the post-processing always runs in float32.
        compile: wrap the network in ``torch.compile(dynamic=False)``. A compiled graph serves
            one input shape, so each batch is zero-padded at the bottom and right up to a size
            bucket and a last partial batch up to ``batch_size`` images: one compilation per
            bucket rather than per image size, at the price of the extra padded pixels in each
            forward pass and a slow first batch per bucket. A bucket side is the short side
            (padded to the size divisibility) plus or minus whole steps of a quarter of it, at
            most the padded ``max_size``: an image resized to the usual short side gets no
            extra rows, its long side up to a quarter of the short side more. The network sees
            the extra padding as it does when batched with a larger image (the post-processing
            cuts each image out of the padded output), which can move its segmentation a
            little. Worth it for many images on a GPU. Needs a C++ compiler (and Triton on
            CUDA); refused with the cause named otherwise.
        num_threads: when given, ``torch.set_num_threads(num_threads)`` (torch's thread count
            is process-wide); left alone by default.

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
        dtype: str | torch.dtype = "float32",
        compile: bool = False,
        num_threads: int | None = None,
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
        if num_threads is not None:
            if num_threads < 1:
                raise OptionError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        self.dtype = _autocast_dtype(dtype, self.device)
        # Memory format is the network's own choice, not the pipeline's: the ResNet backbone keeps
        # its convolutions channels-last (measured faster on CPU), while Swin/BEiT, the deformable
        # pixel decoder and the transformer decoder work on flattened tokens.
        self.module = model.module.to(self.device).eval()
        self.compile = compile
        self._network = _compiled(self.module, self.device) if compile else self.module
        # Whether batches are padded to shape buckets: with compile, and in tests of the padding alone.
        self._buckets = compile
        divisor = max(preprocess.size_divisibility, 1)
        base = _round_up(preprocess.short_side, divisor)
        # (base, step, top) of the compile buckets: see ``compile`` above and ``_bucket_side``.
        self._bucket = (base, max(divisor, _round_up(base // 4, divisor)), _round_up(preprocess.max_size, divisor))
        self._sliding = task == "semantic" and preprocess.window > 0
        # On the CPU: post-processing takes its per-class decisions on the host.
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
        ``(index into inputs, result)``, or ``(index, the ImageLoadError)`` for an unreadable one.

        The outcomes come in input order, a batch's unreadable images before its results. While
        a batch runs, the next one is read and preprocessed in a background thread; an error
        there (other than an unreadable image) is raised here, and the thread ends when the
        iterator is exhausted, closed or garbage-collected.
        """
        with tqdm(total=len(inputs), disable=not progress, unit="img") as bar:
            with contextlib.closing(self._loaded_batches(inputs)) as batches:
                for loaded in batches:
                    for index, error in loaded.errors:
                        bar.update()
                        yield index, error
                    results = self._run_batch(loaded.images, loaded.batch) if loaded.images else []
                    for index, result in zip(loaded.indices, results):
                        bar.update()
                        yield index, result

    def _loaded_batches(self, inputs: Sequence[ImageInput]) -> Iterator[_LoadedBatch]:
        """``inputs`` in batches of ``batch_size``, read and preprocessed, in order; with more than one
        batch, batch k+1 is prepared by a one-thread executor while the caller works on batch k."""
        size = self.batch_size
        chunks = [range(start, min(start + size, len(inputs))) for start in range(0, len(inputs), size)]
        if len(chunks) <= 1:
            yield from (self._load_batch(inputs, chunk) for chunk in chunks)
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=LOADER_THREAD_NAME)
        try:
            pending: Future[_LoadedBatch] = executor.submit(self._load_batch, inputs, chunks[0])
            for following in chunks[1:]:
                current = pending.result()
                pending = executor.submit(self._load_batch, inputs, following)
                yield current
            yield pending.result()
        finally:
            # Joins the thread: a load in progress finishes (one batch at most), a queued one is dropped.
            executor.shutdown(wait=True, cancel_futures=True)

    def _load_batch(self, inputs: Sequence[ImageInput], indices: range) -> _LoadedBatch:
        """Read ``inputs[indices]`` and preprocess the readable ones (may run in the loader thread)."""
        loaded = _LoadedBatch()
        for index in indices:
            try:
                image = load_image(inputs[index])
            except ImageLoadError as error:
                loaded.errors.append((index, error))
                continue
            loaded.indices.append(index)
            loaded.images.append(image)
        # inference_mode is per thread: the loader thread enters it for its own tensors.
        with torch.inference_mode():
            loaded.batch = self._preprocess(loaded.images) if loaded.images else None
        return loaded

    def _preprocess(self, images: list[np.ndarray]) -> Batch | None:
        """The batch the network sees, or None for sliding windows (each image is cut up by itself)."""
        return None if self._sliding else self.preprocessor(images, device=self.device)

    @torch.inference_mode()
    def _run_batch(self, images: list[np.ndarray], batch: Batch | None = None) -> list[SegmentationResult]:
        """One result per HxWx3 uint8 image of ``images``; ``batch``: their preprocessed batch, if made already."""
        if self._sliding:
            return [
                self._semantic_result(image, SemanticPrediction.from_scores(self.sliding_semantic_scores(image)))
                for image in images
            ]
        batch = batch if batch is not None else self._preprocess(images)
        assert batch is not None
        pixels = self._network_input(batch.images)
        outputs = self._forward(pixels)
        self._check_finite(outputs)
        # The padded size the network saw (the compile bucket, if any): post-processing cuts each
        # resized image out of it, so the extra padding changes no geometry.
        padded_size = (pixels.shape[-2], pixels.shape[-1])
        sizes = [
            ImageSizes(padded_size, resized, original)
            for resized, original in zip(batch.image_sizes, batch.original_sizes)
        ]
        predictions = self.architecture.postprocess(
            self.model.description.config, outputs, sizes, self.task, self.threshold, self._is_thing
        )
        return [self._result(image, prediction) for image, prediction in zip(images, predictions)]

    def _network_input(self, images: torch.Tensor, *, spatial: bool = True) -> torch.Tensor:
        """``images [B,3,H,W]`` as the network gets them: unchanged when eager; when compiled,
        zero-padded at the bottom and right to the bucket (``spatial``) and with zero images up to
        ``batch_size``, so that shapes repeat and the compiled graphs are reused."""
        if not self._buckets:
            return images
        count, channels, height, width = images.shape
        if spatial:
            height, width = _bucket_side(height, *self._bucket), _bucket_side(width, *self._bucket)
        shape = (max(count, self.batch_size), channels, height, width)
        if tuple(images.shape) == shape:
            return images
        padded = images.new_zeros(shape)
        padded[:count, :, : images.shape[2], : images.shape[3]] = images
        return padded

    def _forward(self, images: torch.Tensor) -> Any:
        """The network's raw outputs for ``images [B,3,H,W]``, every floating tensor in float32.

        Only the network runs under autocast: the post-processing (resizing logits, softmax,
        thresholds, overlaps) gets float32 outputs whatever the pipeline's dtype.
        """
        if self.dtype == torch.float32:
            return self._call_network(images)
        with torch.autocast(self.device.type, dtype=self.dtype):
            outputs = self._call_network(images)
        return _to_float32(outputs)

    def _call_network(self, images: torch.Tensor) -> Any:
        """The (compiled) network on ``images``; a failure to compile it is an OptionError naming the cause."""
        if not self.compile:
            return self._network(images)
        from torch._dynamo.exc import TorchDynamoException

        try:
            return self._network(images)
        except TorchDynamoException as error:  # tracing or the backend failed, not the network's own code
            raise OptionError(
                f"compile=True: torch.compile could not compile {self.model.name}: {_compile_failure(error)}; "
                "run it without compile"
            ) from error

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
            outputs = self._forward(self._network_input(crops, spatial=False))
            self._check_finite(outputs)
            window_scores = self.architecture.window_scores(outputs)
            for (y0, x0, y1, x1), scores in zip(chunk, window_scores):
                scores = F.interpolate(scores[None], size=crops.shape[-2:], mode="bilinear", align_corners=False)[0]
                summed[:, y0:y1, x0:x1] += scores[:, : y1 - y0, : x1 - x0]
                count[y0:y1, x0:x1] += 1
        return summed, count

    def _check_finite(self, outputs: Any) -> None:
        """Refuse NaN or infinite raw outputs rather than turn them into plausible-looking masks.

        One check per tensor of the whole batch, and one device-to-host transfer for all of them.
        """
        named = list(_named_tensors(outputs))
        if not named:
            return
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named])
        if bool(finite.all()):
            return
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        hint = "" if self.dtype == torch.float32 else " (try dtype='float32')"
        raise ModelOutputError(
            f"{self.model.name} produced NaN or infinite values in {', '.join(bad[:3])}: its weights are "
            f"broken, or the values overflow {str(self.dtype).removeprefix('torch.')}{hint}"
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

    def _semantic_result(self, image: np.ndarray, prediction: SemanticPrediction) -> SegmentationResult:
        """Per-pixel labels; a class's score is its mean confidence (share of the pixel score) where it wins."""
        confidence, seg = prediction.confidence, prediction.labels
        # One pass over the pixels for every class's area and summed confidence, not one per class.
        pixels = seg.flatten()
        areas = torch.bincount(pixels, minlength=len(self.categories.categories))
        summed = torch.bincount(pixels, weights=confidence.flatten().double(), minlength=len(areas))
        present = areas.nonzero()[:, 0]
        label_ids = present.cpu().numpy()
        masks = (seg[None] == present[:, None, None]).cpu().numpy()
        class_scores = (summed[present] / areas[present]).float().cpu().numpy()
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


@dataclasses.dataclass
class _LoadedBatch:
    """One batch of inputs read: the readable images by input ``indices``, the unreadable ones'
    ``errors``, and the readable ones' preprocessed ``batch`` (None for sliding windows)."""

    indices: list[int] = dataclasses.field(default_factory=list)
    images: list[np.ndarray] = dataclasses.field(default_factory=list)
    errors: list[tuple[int, ImageLoadError]] = dataclasses.field(default_factory=list)
    batch: Batch | None = None


def _autocast_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype the network runs in for the ``dtype`` option, checked against ``device``."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise OptionError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if name == "float16" and device.type != "cuda":
        raise OptionError(
            f"dtype float16 runs on CUDA devices only, not on {device.type} (float16 autocast is not "
            "supported there); use dtype='bfloat16' or 'float32'"
        )
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise OptionError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16")
    return DTYPES[name]


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` (inductor) cannot build kernels for ``device`` here, or None if it can."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton, which torch.compile's inductor generates CUDA kernels with (pip install triton)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # inductor raises its own exception types, which vary across versions
        return f"a C++ compiler, which torch.compile's inductor builds its kernels with ({error})"
    return None


def _compiled(module: torch.nn.Module, device: torch.device) -> Any:
    """``module`` wrapped by ``torch.compile`` with static shapes, or an OptionError naming what is missing."""
    problem = compile_problem(device)
    if problem is not None:
        raise OptionError(f"compile=True needs {problem}; run without compile")
    return torch.compile(module, dynamic=False)


def _compile_failure(error: Exception) -> str:
    """The gist of a torch.compile failure: its type, first line and explanation, and the last line
    of the traced code it names (dynamo's messages run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    gist = [f"{type(error).__name__}: {lines[0] if lines else ''}"]
    gist += [line[:300] for line in lines[1:] if line.startswith("Explanation:")][:1]
    gist += [f"at {line}" for line in lines if line.startswith('File "')][-1:]
    return " ".join(gist)


def _to_float32(outputs: Any) -> Any:
    """``outputs`` (a tensor, dataclass, dict, named tuple or sequence) with floating tensors cast to float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):
        fields = {f.name: _to_float32(getattr(outputs, f.name)) for f in dataclasses.fields(outputs) if f.init}
        return dataclasses.replace(outputs, **fields)
    if isinstance(outputs, dict):
        return {key: _to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, tuple) and hasattr(outputs, "_fields"):
        return type(outputs)(*(_to_float32(value) for value in outputs))
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(value) for value in outputs)
    return outputs


def _bucket_side(side: int, base: int, step: int, top: int) -> int:
    """The smallest of ``base + k * step`` (any integer k) that is at least ``side``, lowered to ``top``
    but never below ``side``: where a padded batch side goes when compiling."""
    if side > base:
        bucket = base + _round_up(side - base, step)
    else:
        bucket = base - (base - side) // step * step
    return max(side, min(bucket, top))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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

