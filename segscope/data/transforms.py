"""Training augmentation applied jointly to an image, its target masks and label maps.

``training_transform`` is Mask2Former's COCO recipe (detectron2's LSJ mapper): horizontal
flip, then large-scale jitter (``ResizeScale`` + ``FixedSizeCrop``).

Randomness: every transform draws from the ``torch.Generator`` it is called with, or from
torch's global RNG when given none. Each call draws the same number of values whatever the
outcome, so a generator seeded per sample (e.g. from ``(seed, epoch, index)``) replays the
same augmentation after a resume, independent of worker count and sample order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Sample:
    """One training sample as tensors.

    Attributes:
        image: ``[3, H, W]`` uint8 RGB.
        labels: ``[N]`` int64 class indices.
        masks: ``[N, H, W]`` bool, one per target.
        sem_seg: optional ``[H, W]`` int64 class indices (padding gets the ignore index).
        pan_seg: optional ``[H, W]`` int64 panoptic segment ids (padding gets 0, VOID).
    """

    image: Tensor
    labels: Tensor
    masks: Tensor
    sem_seg: Tensor | None = None
    pan_seg: Tensor | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[0] != 3 or self.image.dtype != torch.uint8:
            raise ValueError(f"image must be [3, H, W] uint8, got {tuple(self.image.shape)} {self.image.dtype}")
        size = tuple(self.image.shape[1:])
        if self.masks.ndim != 3 or tuple(self.masks.shape[1:]) != size or self.masks.dtype != torch.bool:
            raise ValueError(
                f"masks must be [N, {size[0]}, {size[1]}] bool, got {tuple(self.masks.shape)} {self.masks.dtype}"
            )
        if self.labels.shape != (self.masks.shape[0],):
            raise ValueError(f"{self.masks.shape[0]} masks but labels of shape {tuple(self.labels.shape)}")
        for name in ("sem_seg", "pan_seg"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != size:
                raise ValueError(f"{name} must be {list(size)}, got {list(value.shape)}")

    @classmethod
    def from_arrays(
        cls,
        image: np.ndarray | Tensor,
        labels: Tensor,
        masks: Tensor,
        sem_seg: np.ndarray | Tensor | None = None,
        pan_seg: np.ndarray | Tensor | None = None,
    ) -> Sample:
        """A sample from a dataset item's ``[H, W, 3]`` uint8 image and its targets."""
        chw = torch.as_tensor(image).permute(2, 0, 1).contiguous()
        return cls(chw, labels.long(), masks.bool(), _as_map(sem_seg), _as_map(pan_seg))


class Transform(Protocol):
    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample: ...


class Compose:
    """Apply ``transforms`` in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


class RandomHorizontalFlip:
    """Mirror image, masks and maps left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if torch.rand((), generator=generator).item() >= self.p:
            return sample
        return Sample(
            sample.image.flip(-1), sample.labels, sample.masks.flip(-1), _flip(sample.sem_seg), _flip(sample.pan_seg)
        )


@dataclass(frozen=True)
class JitterParams:
    """One draw of large-scale jitter: resize to ``scaled_size`` (h, w), then take the
    output-size window whose top-left corner is ``offset`` (top, left), padding past the edge."""

    scaled_size: tuple[int, int]
    offset: tuple[int, int]


class LargeScaleJitter:
    """Large-scale jitter (Ghiasi et al., 2021) with detectron2's ``ResizeScale`` +
    ``FixedSizeCrop`` semantics.

    The image is resized, keeping its aspect ratio, to fit in ``scale * output_size`` for a
    scale drawn uniformly from ``[min_scale, max_scale]``; a random ``output_size`` window is
    cut where the result is larger, and the bottom/right is padded where it is smaller.
    The image is resized bilinearly (antialiased when shrinking) and padded with
    ``pad_value`` (detectron2's 128: near the mean, so about zero once normalized); masks and
    maps are resized nearest-neighbour; masks pad with False, ``sem_seg`` with
    ``ignore_index``, ``pan_seg`` with 0 (VOID). Targets whose mask ends up empty are dropped.

    Args:
        output_size: ``S`` or ``(height, width)`` of every output.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        pad_value: int = 128,
        ignore_index: int = 255,
    ) -> None:
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"output_size must be a positive int or (height, width), got {output_size}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale} and {max_scale}")
        self.output_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.pad_value = pad_value
        self.ignore_index = ignore_index

    def sample_params(self, height: int, width: int, generator: torch.Generator | None = None) -> JitterParams:
        """Draw the resized size and the crop offset for an input of ``height x width``."""
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        scale = self.min_scale + (self.max_scale - self.min_scale) * u[0]
        out_h, out_w = self.output_size
        factor = min(out_h * scale / height, out_w * scale / width)
        scaled = (max(1, round(height * factor)), max(1, round(width * factor)))
        top = round(max(scaled[0] - out_h, 0) * u[1])
        left = round(max(scaled[1] - out_w, 0) * u[2])
        return JitterParams(scaled, (top, left))

    def apply(self, sample: Sample, params: JitterParams) -> Sample:
        """The sample resized, cropped and padded as ``params`` say; empty targets dropped."""
        height, width = sample.image.shape[1:]
        (scaled_h, scaled_w), (top, left) = params.scaled_size, params.offset
        crop_h, crop_w = min(self.output_size[0], scaled_h - top), min(self.output_size[1], scaled_w - left)
        image = _resize_image(sample.image, (scaled_h, scaled_w))[:, top : top + crop_h, left : left + crop_w]
        # Masks and maps are gathered straight from the source pixels each output pixel falls
        # on, so only the kept window is ever built (no full-size upscaled masks).
        rows = nearest_indices(height, scaled_h)[top : top + crop_h]
        cols = nearest_indices(width, scaled_w)[left : left + crop_w]

        def window(t: Tensor | None, fill: int | bool) -> Tensor | None:
            return None if t is None else self._pad(t.index_select(-2, rows).index_select(-1, cols), fill)

        masks = window(sample.masks, False)
        keep = masks.flatten(1).any(1)
        return Sample(
            self._pad(image, self.pad_value),
            sample.labels[keep],
            masks[keep],
            window(sample.sem_seg, self.ignore_index),
            window(sample.pan_seg, 0),
        )

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        params = self.sample_params(sample.image.shape[1], sample.image.shape[2], generator)
        return self.apply(sample, params)

    def _pad(self, tensor: Tensor, fill: int | bool) -> Tensor:
        """``tensor [..., h, w]`` in the top-left corner of an output-size canvas of ``fill``."""
        out = tensor.new_full((*tensor.shape[:-2], *self.output_size), fill)
        out[..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
        return out


def copy_paste(target: Sample, source: Sample, pasteable: Tensor, generator: torch.Generator | None = None) -> Sample:
    """Simple Copy-Paste (Ghiasi et al., 2021): some of ``source``'s objects pasted onto ``target``.

    Both samples are already augmented to the same size (large-scale jitter). Each source
    object whose class is ``pasteable`` (``[C]`` bool: the thing classes of a panoptic dataset,
    every class of an instance one) is chosen with probability 1/2; the chosen pixels replace
    the target's, without blending, which the paper found as good as Gaussian smoothing. The
    target's masks lose the pasted pixels and targets left empty are dropped; the pasted
    objects are appended. The label maps (``sem_seg``, ``pan_seg``) are not carried over.
    """
    if target.image.shape != source.image.shape:
        sizes = f"{tuple(target.image.shape)} and {tuple(source.image.shape)}"
        raise ValueError(f"copy-paste needs samples of equal size, got {sizes}")
    chosen = pasteable[source.labels] & (torch.rand(len(source.labels), generator=generator) < 0.5)
    if not bool(chosen.any()):
        return Sample(target.image, target.labels, target.masks)
    pasted_masks = source.masks[chosen]
    covered = pasted_masks.any(0)
    image = torch.where(covered, source.image, target.image)
    remaining = target.masks & ~covered
    keep = remaining.flatten(1).any(1)
    return Sample(
        image,
        torch.cat((target.labels[keep], source.labels[chosen])),
        torch.cat((remaining[keep], pasted_masks)),
    )


def training_transform(
    output_size: int | tuple[int, int],
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    flip_prob: float = 0.5,
) -> Compose:
    """Mask2Former's COCO training augmentation: random flip, then large-scale jitter."""
    return Compose([RandomHorizontalFlip(flip_prob), LargeScaleJitter(output_size, min_scale, max_scale)])


def nearest_indices(in_size: int, out_size: int) -> Tensor:
    """Source index of each of ``out_size`` output pixels under nearest-neighbour resizing
    with pixel centres aligned (``F.interpolate(mode="nearest-exact")``, PIL's NEAREST)."""
    # Resizing the index ramp itself makes the rounding at cell boundaries torch's own.
    ramp = torch.arange(in_size, dtype=torch.float32)[None, None]
    return F.interpolate(ramp, size=out_size, mode="nearest-exact")[0, 0].long()


def _as_map(value: np.ndarray | Tensor | None) -> Tensor | None:
    return None if value is None else torch.as_tensor(value).long()


def _flip(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.flip(-1)


def _resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``image [3, H, W]`` uint8 resized bilinearly to ``size`` (h, w)."""
    if tuple(image.shape[1:]) == size:
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)
