"""Pictures of predictions: coloured segments with contours and labels, or instance boxes.

``draw_segmentation`` serves panoptic maps (values are segment ids) and semantic maps (values
are class indices) alike: it only needs which map value belongs to which listed segment.

The drawing is written here with numpy and Pillow rather than taken from ``supervision``'s
annotators (compared with supervision 0.31): those need ``sv.Detections`` (masks and boxes, so
a conversion from panoptic and semantic maps) in BGR, bring matplotlib, requests and eight more
packages, draw no contours, write fixed-size text, and put a mask's label at its centre of mass,
which can fall outside a concave or occluded segment; here it goes to the pixel deepest inside.
On a 1280x914 panoptic result this module draws in 0.42 s, supervision's mask and label
annotators in 0.54 s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from segscope.data.categories import Color, generate_colors
from segscope.errors import OptionError

Segment = tuple[int, str, float | None]

_MIN_FONT_SIZE = 12
# Caption height as a share of the image's short side: 12 px up to 480 px images, 27 px at 1080p.
_FONT_SCALE = 1 / 40
_TEXT_PADDING = 2
# Lighten (+) or darken (-) towards white / black: the shades that tell instances of one class apart.
_SHADE_STEPS = (0.0, 0.35, -0.35, 0.6, -0.6, 0.2, -0.2, 0.5, -0.5, 0.75, -0.75)


@dataclass(frozen=True)
class DrawStyle:
    """How to draw a result.

    Attributes:
        alpha: opacity of the segment colours over the image, in [0, 1] (0: only contours).
        labels: write a caption (class name) on each segment / instance.
        scores: add the score to the captions.
        boxes: draw bounding boxes; None: for instances only.
        font_size: caption size in pixels; None: scaled with the image (see ``font_size_for``).
    """

    alpha: float = 0.5
    labels: bool = True
    scores: bool = True
    boxes: bool | None = None
    font_size: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.font_size is not None and self.font_size < 1:
            raise OptionError(f"font size must be >= 1 pixel, got {self.font_size}")


def font_size_for(height: int, width: int) -> int:
    """Caption font size in pixels for an image of ``height`` x ``width``: grows with the short side."""
    return max(_MIN_FONT_SIZE, round(min(height, width) * _FONT_SCALE))


def instance_colors(base: Sequence[Color], groups: Sequence[int]) -> list[Color]:
    """One colour per item: ``base[k]`` for the first item of each group (class), then lighter and
    darker shades of it for the next ones, so that instances of one class stay apart.

    Args:
        base: N (r, g, b) class colours.
        groups: N group keys (class ids); items of one group must share a base colour.
    """
    if len(base) != len(groups):
        raise ValueError(f"{len(base)} colors for {len(groups)} items")
    used: dict[int, set[Color]] = {}
    colors: list[Color] = []
    for color, group in zip(base, groups):
        taken = used.setdefault(int(group), set())
        step = 0
        shaded = _shade(color, _SHADE_STEPS[0])
        while shaded in taken:
            step += 1
            # Past the listed steps, finer ones: (k * golden ratio) mod 1, alternating in sign.
            t = _SHADE_STEPS[step] if step < len(_SHADE_STEPS) else (-1) ** step * ((step * 0.618034) % 0.9)
            shaded = _shade(color, t)
        taken.add(shaded)
        colors.append(shaded)
    return colors


def _shade(color: Color, t: float) -> Color:
    """``color`` moved a share ``t`` towards white (t > 0) or black (t < 0)."""
    if t >= 0:
        return tuple(int(round(c + t * (255 - c))) for c in color)
    return tuple(int(round(c * (1 + t))) for c in color)


def draw_segmentation(
    image: np.ndarray,
    seg_map: np.ndarray,
    segments: Sequence[Segment],
    colors: Sequence[Color] | None = None,
    alpha: float = 0.5,
    *,
    captions: bool = True,
    show_boxes: bool = False,
    font_size: int | None = None,
) -> Image.Image:
    """Blend a colour over each segment, outline it, and write its label inside it.

    Args:
        image: HxWx3 uint8 RGB.
        seg_map: HxW integers; pixels whose value is no listed segment id stay as they are.
        segments: ``(value in seg_map, label, score or None)`` per segment to draw.
        colors: one (r, g, b) per segment; generated when omitted.
        alpha: opacity of the colour over the image.
        captions: write each segment's label (and score) inside it.
        show_boxes: outline each segment's bounding box in its colour.
        font_size: caption size in pixels; None: ``font_size_for`` the image.

    Returns:
        An RGB ``PIL.Image`` of the image's size.
    """
    _check_image(image)
    if seg_map.shape != image.shape[:2]:
        raise ValueError(f"seg_map has shape {seg_map.shape} but the image is {image.shape[:2]}")
    palette = _palette(colors, len(segments))
    index = _segment_index(seg_map, [segment[0] for segment in segments])
    canvas = _blend(image, index, palette, alpha)
    _draw_contours(canvas, index, palette)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    boxes = ndimage.find_objects(index + 1, max_label=len(segments))
    areas = np.bincount(index[index >= 0], minlength=len(segments))
    # Largest segments first, so the boxes and captions of small ones end up on top.
    order = [k for k in np.argsort(-areas, kind="stable") if boxes[k] is not None]
    if show_boxes:
        for k in order:
            rows, cols = boxes[k]
            draw.rectangle((cols.start, rows.start, cols.stop - 1, rows.stop - 1), outline=tuple(palette[k]), width=2)
    if not captions:
        return picture
    font = _font(font_size or font_size_for(*image.shape[:2]))
    for k in order:
        box = boxes[k]
        y, x = _label_point(index[box] == k)
        _, label, score = segments[k]
        center = (x + box[1].start, y + box[0].start)
        _draw_caption(draw, font, picture.size, _caption(label, score), center, centered=True)
    return picture


def draw_instances(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    scores: np.ndarray | Sequence[float] | None = None,
    colors: Sequence[Color] | None = None,
    alpha: float = 0.5,
    *,
    captions: bool = True,
    show_boxes: bool = True,
    font_size: int | None = None,
) -> Image.Image:
    """Draw instance masks, their boxes and a "label 0.97" caption on each box.

    Args:
        image: HxWx3 uint8 RGB.
        masks: N x H x W bool.
        boxes: N x 4 (x0, y0, x1, y1) in pixels.
        labels: N class names; ``scores``: N confidences or None to leave them out.
        colors: one (r, g, b) per instance; generated when omitted.
        alpha: opacity of the colour over the image.
        captions: write each instance's caption at its box's top-left corner.
        show_boxes: outline each box in the instance's colour.
        font_size: caption size in pixels; None: ``font_size_for`` the image.

    Returns:
        An RGB ``PIL.Image`` of the image's size.
    """
    _check_image(image)
    count = len(labels)
    if masks.shape != (count, *image.shape[:2]) or np.shape(boxes) != (count, 4):
        raise ValueError(
            f"expected {count} masks of shape {image.shape[:2]} and {count} boxes, "
            f"got masks {masks.shape} and boxes {np.shape(boxes)}"
        )
    palette = _palette(colors, count)
    # Larger instances first, so smaller ones drawn later stay visible on top.
    order = np.argsort(-masks.sum(axis=(1, 2)), kind="stable")
    index = np.full(image.shape[:2], -1, dtype=np.int64)
    for k in order:
        index[masks[k]] = k
    canvas = _blend(image, index, palette, alpha)
    _draw_contours(canvas, index, palette)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    if show_boxes:
        for k in order:
            x0, y0, x1, y1 = (float(v) for v in boxes[k])
            draw.rectangle((x0, y0, x1, y1), outline=tuple(palette[k]), width=2)
    if not captions:
        return picture
    font = _font(font_size or font_size_for(*image.shape[:2]))
    for k in order:
        score = None if scores is None else float(scores[k])
        corner = (float(boxes[k][0]), float(boxes[k][1]))
        _draw_caption(draw, font, picture.size, _caption(labels[k], score), corner, fill=palette[k])
    return picture


def save_png(picture: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``picture`` (a PIL image or an HxWx3 uint8 array) as PNG, creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    picture.save(path, format="PNG")
    return path


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {getattr(image, 'shape', type(image).__name__)}")


def _palette(colors: Sequence[Color] | None, count: int) -> np.ndarray:
    """[count, 3] uint8 colours."""
    if colors is None:
        colors = generate_colors(count)
    if len(colors) != count:
        raise ValueError(f"{count} segments but {len(colors)} colors")
    return np.asarray(colors, dtype=np.uint8).reshape(count, 3)


def _segment_index(seg_map: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """HxW int64: the position in ``ids`` of each pixel's value, -1 where it is not listed."""
    index = np.full(seg_map.shape, -1, dtype=np.int64)
    if len(set(ids)) != len(ids):
        raise ValueError(f"segment ids must be unique, got {list(ids)}")
    if not ids:
        return index
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids)
    slot = np.searchsorted(ids[order], seg_map).clip(max=len(ids) - 1)
    found = ids[order][slot] == seg_map
    index[found] = order[slot[found]]
    return index


def _blend(image: np.ndarray, index: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    """The image with ``palette[index]`` blended in where ``index >= 0``; HxWx3 uint8."""
    covered = index >= 0
    canvas = image.copy()
    mixed = (1 - alpha) * image[covered] + alpha * palette[index[covered]].astype(np.float32)
    canvas[covered] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    return canvas


def _draw_contours(canvas: np.ndarray, index: np.ndarray, palette: np.ndarray) -> None:
    """Paint, in place, the pixels of each segment that touch another value a darker shade."""
    edge = np.zeros(index.shape, dtype=bool)
    vertical = index[1:] != index[:-1]
    horizontal = index[:, 1:] != index[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge &= index >= 0
    canvas[edge] = (palette[index[edge]] * 0.6).astype(np.uint8)


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """(y, x) of a pixel of ``mask`` farthest from its border (the crop's edge counts as border).

    Of the tied farthest pixels (a band, in elongated shapes), the one nearest the centroid.
    """
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(distance == distance.max())
    cy, cx = (coords.mean() for coords in np.nonzero(mask))
    nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(ys[nearest]), int(xs[nearest])


def _caption(label: str, score: float | None) -> str:
    return label if score is None else f"{label} {score:.2f}"


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font: available offline, no system fonts needed; scalable since Pillow 10.1.
    return ImageFont.load_default(size=size)


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    bounds: tuple[int, int],
    text: str,
    anchor: tuple[float, float],
    fill: np.ndarray | None = None,
    centered: bool = False,
) -> None:
    """Text on a filled box at ``anchor`` (its top-left, or centre), kept inside ``bounds`` (w, h)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 2 * _TEXT_PADDING, bottom - top + 2 * _TEXT_PADDING
    x, y = anchor
    if centered:
        x, y = x - width / 2, y - height / 2
    image_width, image_height = bounds
    x = min(max(x, 0), max(image_width - width, 0))
    y = min(max(y, 0), max(image_height - height, 0))
    background = (0, 0, 0) if fill is None else tuple(int(c) for c in fill)
    # Dark text on light boxes, light text on dark ones (ITU-R BT.601 luma).
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    ink = (0, 0, 0) if luma > 140 else (255, 255, 255)
    draw.rectangle((x, y, x + width, y + height), fill=background)
    draw.text((x + _TEXT_PADDING - left, y + _TEXT_PADDING - top), text, font=font, fill=ink)
