"""Test-time preprocessing: resize, normalize and pad a list of images into one batch.

The resize follows detectron2's ``ResizeShortestEdge`` (the rule Mask2Former was evaluated
with), optionally followed by mmseg's ``ResizeToMultiple`` (stretch instead of padding), and
``sliding_windows`` follows mmseg's sliding-window inference grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segscope.config import PreprocessConfig


@dataclass
class Batch:
    """Images ready for a model, and the sizes needed to map predictions back.

    Attributes:
        images: [B, 3, Hp, Wp] float32, normalized, zero-padded at the bottom and right to a
            common size that is a multiple of the size divisibility.
        image_sizes: (h, w) of each image after resizing, before padding (with
            ``resize_to_multiple``, the stretched size: itself a multiple of the divisibility).
        original_sizes: (h, w) of each image as given.
    """

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


def resized_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """(h, w) after scaling the short side to ``short_side``, capping the long side at ``max_size``.

    Same float operations, in the same order, as detectron2's ``ResizeShortestEdge``, so that
    sizes landing on exactly x.5 round (half up) the same way. Unlike detectron2, no side
    rounds down to 0: an image of extreme aspect ratio (3 x 5000) keeps at least one row.
    """
    scale = short_side / min(height, width)
    if height < width:
        new_h, new_w = float(short_side), scale * width
    else:
        new_h, new_w = scale * height, float(short_side)
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def normalize(images: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """``(images - mean) / std`` in float32 for 0-255 RGB ``images [..., 3, H, W]`` (any dtype)."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float() - mean) / std


class Preprocessor:
    """Resize, normalize and pad HxWx3 uint8 RGB images into a ``Batch``."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg

    def __call__(self, images: Sequence[np.ndarray], device: str | torch.device | None = None) -> Batch:
        """Preprocess ``images`` (HxWx3 uint8 RGB each) on ``device`` (default: CPU)."""
        if len(images) == 0:
            raise ValueError("Preprocessor needs at least one image")
        tensors = [self.prepare(image, device, index) for index, image in enumerate(images)]
        return Batch(
            images=self.pad(tensors),
            image_sizes=[(t.shape[1], t.shape[2]) for t in tensors],
            original_sizes=[(image.shape[0], image.shape[1]) for image in images],
        )

    def prepare(self, image: np.ndarray, device: str | torch.device | None = None, index: int = 0) -> torch.Tensor:
        """One HxWx3 uint8 RGB ``image`` resized and normalized, not padded: [3, h, w] float32.

        ``index`` only names the image in the error raised for a bad array.
        """
        _check_image(image, index)
        device = torch.device(device) if device is not None else torch.device("cpu")
        return normalize(self._resize(image, device), self.cfg)

    def _resize(self, image: np.ndarray, device: torch.device) -> torch.Tensor:
        """[3, h, w] float32 in 0-255: the short-side resize, then the stretch to a multiple if asked."""
        height, width = image.shape[:2]
        # Copy to the device as uint8: a quarter of the bytes of float32.
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float()
        resized = _resize_pixels(pixels, resized_shape(height, width, self.cfg.short_side, self.cfg.max_size))
        if not self.cfg.resize_to_multiple:
            return resized
        # mmseg's ResizeToMultiple: a second resize of the (quantized) resized image.
        divisor = self._divisor()
        return _resize_pixels(resized, (_round_up(resized.shape[1], divisor), _round_up(resized.shape[2], divisor)))

    def _divisor(self) -> int:
        return max(self.cfg.size_divisibility, 1)

    def pad(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors ``[3, h, w]`` zero-padded at the bottom and right and stacked: ``[B, 3, Hp, Wp]``,
        the largest h and w rounded up to a multiple of the size divisibility."""
        divisor = self._divisor()
        height = _round_up(max(t.shape[1] for t in tensors), divisor)
        width = _round_up(max(t.shape[2] for t in tensors), divisor)
        batch = tensors[0].new_zeros((len(tensors), 3, height, width))
        for i, tensor in enumerate(tensors):
            batch[i, :, : tensor.shape[1], : tensor.shape[2]] = tensor
        return batch


def _resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``pixels [3, h, w]`` (0-255) resized to ``size`` with antialiased bilinear interpolation."""
    if size == tuple(pixels.shape[1:]):
        return pixels
    resized = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    # The reference pipelines resize uint8 images with PIL; rounding keeps the same quantization.
    return resized.round_().clamp_(0, 255)


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows ``(y0, x0, y1, x1)`` of an mmseg-style sliding-window inference over an image.

    Windows are ``crop`` x ``crop`` (smaller only when the image is), start every ``stride``
    pixels, and the last one in each direction is shifted back to end at the border, so they
    cover the image exactly once or more with no window outside it.
    """
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be positive, got crop={crop} stride={stride}")
    if stride > crop:
        raise ValueError(f"stride {stride} > crop {crop} would leave gaps between windows")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return [
        (y0, x0, y0 + min(crop, height), x0 + min(crop, width))
        for y0 in _window_starts(height, crop, stride)
        for x0 in _window_starts(width, crop, stride)
    ]


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def _check_image(image: np.ndarray, index: int) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        if isinstance(image, np.ndarray):
            described = f"shape {image.shape} dtype {image.dtype}"
        else:
            described = type(image).__name__
        raise ValueError(
            f"image {index}: expected an HxWx3 uint8 RGB array, got {described} (segscope.io.load_image makes one)"
        )
