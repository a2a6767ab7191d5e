"""Sliding-window inference (mmseg's ``slide_inference``) as the pipeline's semantic test mode."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import segscope
from segscope.checkpoints.segscope_format import ModelDescription
from segscope.config import PreprocessConfig
from segscope.data.synthetic import SYNTHETIC_CATEGORIES
from segscope.engine.evaluate import evaluate
from segscope.errors import ConfigError
from segscope.loading import LoadedModel
from segscope.models import build_model
from segscope.models.mask2former.model import Mask2FormerOutput
from segscope.pipeline import SegmentationPipeline
from segscope.transforms import Preprocessor, sliding_windows
from segscope.zoo import DEMO_CONFIG


@pytest.fixture(scope="module")
def demo_module() -> nn.Module:
    """The demo architecture (6 classes) with random weights."""
    torch.manual_seed(0)
    return build_model(DEMO_CONFIG).eval()


def _pipeline(
    module: nn.Module, preprocess: PreprocessConfig, task: str = "semantic", **options: Any
) -> SegmentationPipeline:
    description = ModelDescription(DEMO_CONFIG, SYNTHETIC_CATEGORIES, preprocess, "semantic")
    return SegmentationPipeline(LoadedModel(module, description, "random-demo"), task=task, device="cpu", **options)


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise with two flat rectangles: HxWx3 uint8."""
    image = np.random.default_rng(seed).integers(0, 80, (height, width, 3), dtype=np.uint8)
    image[height // 8 : height // 2, width // 6 : width // 2] = (220, 40, 40)
    image[height // 2 : height - 4, width // 2 : width - 6] = (40, 200, 60)
    return image


def _crop_scores(module: nn.Module, crop: Tensor) -> Tensor:
    """mmseg + ViT-Adapter order for one normalized ``crop [3,h,w]``: scores at the output stride,
    resized to the crop's size padded to a multiple of 32, cut back to the crop: ``[C,h,w]``."""
    height, width = crop.shape[-2:]
    padded = F.pad(crop, (0, -width % 32, 0, -height % 32))
    outputs = module(padded[None])
    class_probs = outputs.class_logits[0].softmax(-1)[:, :-1]
    scores = torch.einsum("qc,qhw->chw", class_probs, outputs.mask_logits[0].sigmoid())
    return _to_size(scores, padded.shape[-2:])[:, :height, :width]


def _to_size(scores: Tensor, size: tuple[int, ...]) -> Tensor:
    """``scores [C,h,w]`` bilinearly resized to ``size`` (align_corners=False): ``[C,*size]``."""
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("resize_to_multiple", [True, False])
@torch.inference_mode()
def test_one_window_over_the_whole_image_is_a_whole_image_pass(
    demo_module: nn.Module, resize_to_multiple: bool
) -> None:
    # 70x100 -> 64x91 (stretched to 64x96, or padded to it): one window, the whole image.
    preprocess = PreprocessConfig(
        short_side=64, max_size=256, resize_to_multiple=resize_to_multiple, window=128, window_stride=96
    )
    image = _picture(70, 100)
    segment = _pipeline(demo_module, preprocess)
    pixels = Preprocessor(preprocess).prepare(image)
    assert tuple(pixels.shape[-2:]) == ((64, 96) if resize_to_multiple else (64, 91))

    expected = _to_size(_crop_scores(demo_module, pixels), (70, 100))
    torch.testing.assert_close(segment.sliding_semantic_scores(image), expected, rtol=0, atol=1e-5)
    result = segment(image)
    assert result["semantic_seg"].shape == (70, 100)
    assert np.array_equal(result["semantic_seg"], expected.argmax(0).numpy())


@pytest.mark.parametrize(
    ("size", "preprocess", "num_windows"),
    [
        # 120x180 stretched to 128x192: 64x64 windows at y 0, 48, 64 and x 0, 48, 96, 128.
        ((120, 180), PreprocessConfig(120, 512, resize_to_multiple=True, window=64, window_stride=48), 12),
        # 50x200 kept as is: windows 50 high (the whole height), padded to 64 for the model.
        ((50, 200), PreprocessConfig(50, 512, window=64, window_stride=48), 4),
    ],
)
@torch.inference_mode()
def test_overlapping_windows_average_the_scores_of_every_window_covering_a_pixel(
    demo_module: nn.Module, size: tuple[int, int], preprocess: PreprocessConfig, num_windows: int
) -> None:
    image = _picture(*size)
    segment = _pipeline(demo_module, preprocess)
    batch = Preprocessor(preprocess)([image])
    height, width = batch.image_sizes[0]
    pixels = batch.images[0, :, :height, :width]
    windows = sliding_windows(height, width, preprocess.window, preprocess.window_stride)
    assert len(windows) == num_windows

    summed = torch.zeros(DEMO_CONFIG.num_classes, height, width)
    count = torch.zeros(height, width)
    for y0, x0, y1, x1 in windows:
        summed[:, y0:y1, x0:x1] += _crop_scores(demo_module, pixels[:, y0:y1, x0:x1])
        count[y0:y1, x0:x1] += 1

    got_summed, got_count = segment._window_scores(segment.preprocessor.prepare(image))
    assert got_count.min() >= 1 and got_count.max() > 1
    assert torch.equal(got_count, count)
    torch.testing.assert_close(got_summed / got_count, summed / count, rtol=0, atol=1e-5)
    expected = _to_size(summed / count, size)
    torch.testing.assert_close(segment.sliding_semantic_scores(image), expected, rtol=0, atol=1e-5)
    assert np.array_equal(segment(image)["semantic_seg"], expected.argmax(0).numpy())


class _LocalModel(nn.Module):
    """A translation-equivariant stand-in for Mask2Former: query masks are fixed mixes of the
    4x4-pooled colours, class logits fixed, so windows agree where they overlap (but near
    their borders, where the stride-4 upsampling clamps)."""

    def __init__(self, num_queries: int = 5, num_classes: int = 6) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("mix", torch.randn(num_queries, 3, generator=generator))
        self.register_buffer("class_logits", 2 * torch.randn(num_queries, num_classes + 1, generator=generator))

    def forward(self, images: Tensor) -> Mask2FormerOutput:
        """``images [B,3,H,W]`` -> class logits ``[B,Q,C+1]``, mask logits ``[B,Q,H/4,W/4]``."""
        mask_logits = torch.einsum("qc,bchw->bqhw", self.mix, F.avg_pool2d(images, 4))
        return Mask2FormerOutput(self.class_logits.expand(len(images), -1, -1), mask_logits)


@torch.inference_mode()
def test_averaged_scores_are_continuous_across_window_seams() -> None:
    # A random Mask2Former's windows disagree with each other (on this ramp its seams step by
    # 7-27x the median column step): continuity is a property of a model consistent across
    # windows, which the equivariant stand-in is. Its seams step by ~1.75x the usual column
    # step (border clamping of the stride-4 upsampling); summing without dividing by the
    # count, or counting windows wrongly, steps by over 100x.
    preprocess = PreprocessConfig(short_side=128, max_size=512, window=64, window_stride=48)
    segment = _pipeline(_LocalModel(), preprocess)
    y, x = np.mgrid[0:128, 0:192] / np.array([128, 192])[:, None, None]
    image = np.stack([100 + 60 * x, 110 + 40 * y, 140 - 40 * x + 20 * y], -1).round().astype(np.uint8)

    # No resize: the scores are at the windows' own pixels.
    scores = segment.sliding_semantic_scores(image)
    windows = sliding_windows(128, 192, preprocess.window, preprocess.window_stride)
    seams = sorted({column for _, x0, _, x1 in windows for column in (x0, x1) if 0 < column < 192})
    assert seams == [48, 64, 96, 112, 128, 160]
    # step[i]: mean |difference| between columns i and i + 1.
    step = (scores[:, :, 1:] - scores[:, :, :-1]).abs().mean((0, 1))
    elsewhere = step[[i for i in range(191) if i + 1 not in seams]].median()
    assert elsewhere > 0
    assert (step[[s - 1 for s in seams]] <= 3 * elsewhere).all()


@torch.inference_mode()
def test_batching_windows_does_not_change_the_result(demo_module: nn.Module) -> None:
    # 12 windows: one, three and five per forward pass (the last batch of five is short).
    preprocess = PreprocessConfig(short_side=120, max_size=512, resize_to_multiple=True, window=64, window_stride=48)
    images = [_picture(120, 180), _picture(90, 130, seed=1)]
    one = _pipeline(demo_module, preprocess, batch_size=1)
    reference = one.sliding_semantic_scores(images[0])
    for batch_size in (3, 5):
        batched = _pipeline(demo_module, preprocess, batch_size=batch_size)
        torch.testing.assert_close(batched.sliding_semantic_scores(images[0]), reference, rtol=0, atol=1e-5)
        # A list of images goes through the batched pipeline one image's windows at a time.
        for single, listed in zip(images, batched(images)):
            assert np.array_equal(listed["semantic_seg"], one(single)["semantic_seg"])


@torch.inference_mode()
def test_resize_to_multiple_stretches_instead_of_padding(demo_module: nn.Module) -> None:
    # 100x150 with a short side of 96 is 96x144; the width is stretched to 160, not padded.
    image = _picture(100, 150)
    stretch = PreprocessConfig(short_side=96, max_size=512, resize_to_multiple=True)
    batch = Preprocessor(stretch)([image])
    assert tuple(batch.images.shape) == (1, 3, 96, 160)
    assert batch.image_sizes == [(96, 160)] and batch.original_sizes == [(100, 150)]
    assert batch.images[0, :, -1].abs().sum() > 0 and batch.images[0, :, :, -1].abs().sum() > 0
    padded = Preprocessor(dataclasses.replace(stretch, resize_to_multiple=False))([image])
    assert padded.image_sizes == [(96, 144)] and padded.images[0, :, :, 144:].abs().sum() == 0

    # The whole stretched image maps back onto the whole original (detectron2's order).
    outputs = demo_module(batch.images)
    mask_logits = _to_size(outputs.mask_logits[0], (96, 160))
    mask_logits = _to_size(mask_logits, (100, 150))
    class_probs = outputs.class_logits[0].softmax(-1)[:, :-1]
    expected = torch.einsum("qc,qhw->chw", class_probs, mask_logits.sigmoid()).argmax(0)
    result = _pipeline(demo_module, stretch)(image)
    assert result["semantic_seg"].shape == (100, 150)
    assert np.array_equal(result["semantic_seg"], expected.numpy())
    assert _pipeline(demo_module, stretch, task="panoptic")(image)["panoptic_seg"].shape == (100, 150)


def test_a_window_needs_a_stride() -> None:
    with pytest.raises(ConfigError, match="window_stride"):
        PreprocessConfig(window=64, window_stride=0)


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_other_tasks_ignore_the_window(tiny_checkpoint: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The random demo model's queries all favour "no object": the tiny model has segments.
    loaded = segscope.load(tiny_checkpoint)
    whole = loaded.description.preprocess
    windowed = dataclasses.replace(whole, window=32, window_stride=16)
    description = dataclasses.replace(loaded.description, preprocess=windowed)
    loaded_windowed = dataclasses.replace(loaded, description=description)
    image = _picture(70, 100)
    expected = SegmentationPipeline(loaded, task=task, device="cpu", threshold=0.0)(image)
    monkeypatch.setattr(SegmentationPipeline, "sliding_semantic_scores", _must_not_slide)
    result = SegmentationPipeline(loaded_windowed, task=task, device="cpu", threshold=0.0)(image)
    assert len(result["masks"]) > 0
    assert np.array_equal(result["masks"], expected["masks"])
    np.testing.assert_array_equal(result["scores"], expected["scores"])


def _must_not_slide(self: SegmentationPipeline, image: np.ndarray) -> Tensor:
    raise AssertionError("only the semantic task slides windows")


def test_semantic_evaluation_slides_windows(
    demo_module: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preprocess = PreprocessConfig(short_side=96, max_size=256, resize_to_multiple=True, window=64, window_stride=48)
    segment = _pipeline(demo_module, preprocess)
    image = _picture(96, 150)
    (tmp_path / "val").mkdir()
    (tmp_path / "semantic_val").mkdir()
    Image.fromarray(image).save(tmp_path / "val" / "a.png")
    # The ground truth is the sliding prediction itself: evaluation that slides scores 100.
    labels = segment(image)["semantic_seg"].astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "semantic_val" / "a.png")

    calls = []
    slide = SegmentationPipeline.sliding_semantic_scores

    def counted(self: SegmentationPipeline, image: np.ndarray) -> Tensor:
        calls.append(image.shape)
        return slide(self, image)

    monkeypatch.setattr(SegmentationPipeline, "sliding_semantic_scores", counted)
    results = evaluate(segment.model, tmp_path, "semantic", "val", device="cpu")
    assert calls == [(96, 150, 3)]
    assert results["aAcc"] == pytest.approx(100.0)
