"""A small synthetic data set in COCO layout: random shapes over textured backgrounds.

Each scene has 1-3 stuff regions (straight-edged Voronoi cells), each filled with its class's
texture (stripes, checkerboard, speckle), and 1-5 things (circle, square, triangle: regular
polygons of 24, 4 and 3 sides with about equal areas) painted in their class's colour,
jittered, in random order so that later shapes occlude earlier ones. Sometimes a crowd (a
cluster of small shapes of one class) is added and marked ``iscrowd``. A thin black frame and
segments left with too few visible pixels are VOID. Shape and colour both identify a thing
class, texture a stuff class: a tiny model learns it to a high PQ on a CPU in minutes, while
occlusion, touching instances of one class and partial crowds keep it from being trivial.

Written layout under ``root`` for each split (``train``, ``val``)::

    {split}/{image_id:012d}.png              images
    annotations/panoptic_{split}.json        panoptic_{split}/*.png   (kind "panoptic")
    annotations/instances_{split}.json                                 (kind "instances")
    semantic_{split}/*.png                   labels 0..5, 255 = VOID   (kind "semantic")

Instance masks use all three COCO encodings: polygons for unoccluded shapes, compressed RLE
for occluded ones, uncompressed RLE for crowds (as in COCO). Output is a function of the
seed alone; scene ``i`` of a split does not depend on how many scenes are written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segscope.data.annotations import MAX_SEGMENT_ID
from segscope.data.categories import Category, CategorySet
from segscope.data.panoptic_png import id_to_rgb
from segscope.evaluation.rle import masks_to_rle

# Category colours are also the colours things are painted in and stuff textures are made of.
SYNTHETIC_CATEGORIES = CategorySet(
    (
        Category(1, "circle", True, (220, 40, 40)),
        Category(2, "square", True, (40, 70, 220)),
        Category(3, "triangle", True, (220, 60, 210)),
        # Stuff ids are not contiguous with the thing ids, so id/index mix-ups show.
        Category(11, "stripes", False, (200, 170, 60)),
        Category(12, "checkerboard", False, (150, 150, 150)),
        Category(13, "speckle", False, (40, 140, 120)),
    )
)

KINDS = ("panoptic", "instances", "semantic")
SPLITS = ("train", "val")

# Thing shape per category id: (sides, circumradius factor). The factors give the three
# shapes about the same area, so size is no cue to the class.
_SHAPES = {1: (24, 1.0), 2: (4, 1.25), 3: (3, 1.5)}
_IGNORE = 255


@dataclass(frozen=True)
class SceneSegment:
    """One labelled segment of a scene; ``polygon`` is set when the segment is exactly the
    rasterized polygon (an unoccluded shape), else None."""

    id: int
    category_id: int
    iscrowd: bool
    polygon: list[float] | None


@dataclass(frozen=True)
class Scene:
    """``image [H, W, 3]`` uint8 and ``pan_seg [H, W]`` int64 segment ids (0 = VOID)."""

    image: np.ndarray
    pan_seg: np.ndarray
    segments: tuple[SceneSegment, ...]


@dataclass
class _Part:
    category_id: int
    iscrowd: bool
    full_mask: np.ndarray | None = None  # the whole shape, for things drawn from one polygon
    polygon: list[float] | None = None


def generate_scene(rng: np.random.Generator, height: int = 128, width: int = 128, border: int = 2) -> Scene:
    """One random scene drawn from ``rng`` (see the module docstring)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3))
    owner = np.full((height, width), -1)  # index into parts of the part each pixel shows
    parts: list[_Part] = []

    def paint(mask: np.ndarray, pixels: np.ndarray, part: _Part) -> None:
        image[mask] = pixels[mask] if pixels.ndim == 3 else pixels
        owner[mask] = len(parts)
        parts.append(part)

    stuff_ids = [c.id for c in SYNTHETIC_CATEGORIES if not c.isthing]
    regions = _stuff_regions(rng, ys, xs, count=int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35])))
    for region, category_id in zip(regions, rng.choice(stuff_ids, size=len(regions), replace=False)):
        texture = _TEXTURES[int(category_id)](rng, ys, xs, _jittered_color(rng, int(category_id), 25))
        paint(region, texture, _Part(int(category_id), iscrowd=False))

    unit = min(height, width)
    thing_ids = list(_SHAPES)
    if rng.random() < 0.15:
        category_id = int(rng.choice(thing_ids))
        centre = rng.uniform(0.25, 0.75, 2) * (width, height)
        crowd = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(4, 8))):
            at = centre + rng.uniform(-0.12, 0.12, 2) * unit
            crowd |= _rasterize(_shape_polygon(rng, category_id, at, 0.04 * unit), height, width)
        paint(crowd, _jittered_color(rng, category_id, 35), _Part(category_id, iscrowd=True))
    for _ in range(int(rng.integers(1, 6))):
        category_id = int(rng.choice(thing_ids))
        centre = rng.uniform(0.1, 0.9, 2) * (width, height)
        polygon = _shape_polygon(rng, category_id, centre, rng.uniform(0.07, 0.18) * unit)
        mask = _rasterize(polygon, height, width)
        paint(mask, _jittered_color(rng, category_id, 35), _Part(category_id, False, mask, polygon))

    if border:
        frame = np.ones((height, width), dtype=bool)
        frame[border:-border, border:-border] = False
        image[frame] = 0
        owner[frame] = -1
    image += rng.normal(0.0, 5.0, image.shape)
    segment_ids = rng.choice(MAX_SEGMENT_ID, size=len(parts), replace=False) + 1
    return _label(np.clip(image.round(), 0, 255).astype(np.uint8), owner, parts, segment_ids)


def _label(image: np.ndarray, owner: np.ndarray, parts: list[_Part], segment_ids: np.ndarray) -> Scene:
    """The scene's segments; a part with too few visible pixels is left VOID."""
    min_area = max(1, round(0.002 * owner.size))
    pan_seg = np.zeros(owner.shape, dtype=np.int64)
    segments: list[SceneSegment] = []
    for k, (part, segment_id) in enumerate(zip(parts, segment_ids.tolist())):
        visible = owner == k
        if visible.sum() < min_area:
            continue
        pan_seg[visible] = segment_id
        exact = part.full_mask is not None and np.array_equal(visible, part.full_mask)
        segments.append(SceneSegment(segment_id, part.category_id, part.iscrowd, part.polygon if exact else None))
    return Scene(image, pan_seg, tuple(segments))


def _stuff_regions(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` Voronoi cells covering the image, each at least 10% of it (best of 10 tries)."""
    best: list[np.ndarray] = []
    best_smallest = -1.0
    for _ in range(10):
        seeds = rng.uniform(0, 1, (count, 2)) * (xs.shape[1], xs.shape[0])
        distance = (xs[None] - seeds[:, 0, None, None]) ** 2 + (ys[None] - seeds[:, 1, None, None]) ** 2
        nearest = distance.argmin(0)
        regions = [nearest == k for k in range(count)]
        smallest = min(float(r.mean()) for r in regions)
        if smallest > best_smallest:
            best, best_smallest = regions, smallest
        if smallest >= 0.1:
            break
    return best


def _shape_polygon(rng: np.random.Generator, category_id: int, centre: np.ndarray, radius: float) -> list[float]:
    """A randomly rotated regular polygon of the thing class, as COCO's flat [x0, y0, ...]."""
    sides, factor = _SHAPES[category_id]
    angles = rng.uniform(0, 2 * np.pi) + np.arange(sides) * (2 * np.pi / sides)
    points = np.stack([centre[0] + factor * radius * np.cos(angles), centre[1] + factor * radius * np.sin(angles)], 1)
    return points.ravel().round(2).tolist()


def _rasterize(polygon: list[float], height: int, width: int) -> np.ndarray:
    # pycocotools' rasterizer, so a polygon in the instances JSON decodes to exactly this mask.
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))).astype(bool)


def _jittered_color(rng: np.random.Generator, category_id: int, amount: float) -> np.ndarray:
    base = np.array(SYNTHETIC_CATEGORIES[SYNTHETIC_CATEGORIES.id_to_index[category_id]].color, dtype=np.float64)
    return np.clip(base + rng.uniform(-amount, amount, 3), 0, 255)


def _stripes(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, color: np.ndarray) -> np.ndarray:
    period, angle = rng.uniform(7, 12), rng.uniform(0, np.pi)
    phase = (xs * np.cos(angle) + ys * np.sin(angle) + rng.uniform(0, period)) % period
    return np.where((phase < period / 2)[..., None], color, 0.45 * color)


def _checkerboard(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, color: np.ndarray) -> np.ndarray:
    cell = int(rng.integers(5, 9))
    dy, dx = rng.integers(0, cell, 2)
    light = (((ys + dy) // cell + (xs + dx) // cell) % 2 == 0)[..., None]
    return np.where(light, np.minimum(1.4 * color, 255), 0.5 * color)


def _speckle(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, color: np.ndarray) -> np.ndarray:
    return color + rng.normal(0.0, 40.0, (*ys.shape, 3))


_TEXTURES: dict[int, Callable[[np.random.Generator, np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    11: _stripes,
    12: _checkerboard,
    13: _speckle,
}


def write_synthetic_dataset(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    image_size: tuple[int, int] = (128, 128),
    seed: int = 0,
    kinds: Iterable[str] = KINDS,
) -> Path:
    """Write the synthetic scenes and the annotation ``kinds`` asked for; return ``root``.

    Args:
        image_size: (height, width) of every image.
        kinds: any of "panoptic", "instances", "semantic".
    """
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown annotation kinds {unknown}; expected some of {KINDS}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got {num_train} and {num_val}")
    root = Path(root)
    height, width = image_size
    for split_code, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        writer = _SplitWriter(root, split, kinds, seed)
        for index in range(count):
            rng = np.random.default_rng([seed, split_code, index])
            writer.add(index + 1, generate_scene(rng, height, width))
        writer.finish()
    return root


def write_synthetic_panoptic(
    root: str | Path, num_train: int = 64, num_val: int = 16, image_size: tuple[int, int] = (128, 128), seed: int = 0
) -> Path:
    """The scenes as COCO panoptic: ``annotations/panoptic_{split}.json`` + ``panoptic_{split}/``."""
    return write_synthetic_dataset(root, num_train, num_val, image_size, seed, kinds=("panoptic",))


def write_synthetic_instances(
    root: str | Path, num_train: int = 64, num_val: int = 16, image_size: tuple[int, int] = (128, 128), seed: int = 0
) -> Path:
    """The scenes' things as COCO instances: ``annotations/instances_{split}.json``."""
    return write_synthetic_dataset(root, num_train, num_val, image_size, seed, kinds=("instances",))


def write_synthetic_semantic(
    root: str | Path, num_train: int = 64, num_val: int = 16, image_size: tuple[int, int] = (128, 128), seed: int = 0
) -> Path:
    """The scenes as semantic label PNGs in ``semantic_{split}/`` (class index, 255 = VOID)."""
    return write_synthetic_dataset(root, num_train, num_val, image_size, seed, kinds=("semantic",))


class _SplitWriter:
    """Writes one split's images and label files, collecting the JSON records as it goes."""

    def __init__(self, root: Path, split: str, kinds: tuple[str, ...], seed: int) -> None:
        self.root, self.split, self.kinds, self.seed = root, split, kinds, seed
        folders = [split] + [f"{k}_{split}" for k in ("panoptic", "semantic") if k in kinds]
        for folder in folders:
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.images: list[dict[str, Any]] = []
        self.panoptic: list[dict[str, Any]] = []
        self.instances: list[dict[str, Any]] = []

    def add(self, image_id: int, scene: Scene) -> None:
        stem = f"{image_id:012d}"
        height, width = scene.pan_seg.shape
        Image.fromarray(scene.image).save(self.root / self.split / f"{stem}.png")
        self.images.append({"id": image_id, "file_name": f"{stem}.png", "height": height, "width": width})
        if "panoptic" in self.kinds:
            Image.fromarray(id_to_rgb(scene.pan_seg)).save(self.root / f"panoptic_{self.split}" / f"{stem}.png")
            self.panoptic.append(
                {
                    "image_id": image_id,
                    "file_name": f"{stem}.png",
                    "segments_info": [_panoptic_segment(scene, s) for s in scene.segments],
                }
            )
        if "instances" in self.kinds:
            things = (s for s in scene.segments if _is_thing(s.category_id))
            for segment in things:
                self.instances.append(_instance(scene, segment, image_id, len(self.instances) + 1))
        if "semantic" in self.kinds:
            Image.fromarray(_semantic_labels(scene)).save(self.root / f"semantic_{self.split}" / f"{stem}.png")

    def finish(self) -> None:
        info = {"description": "segscope synthetic shapes", "seed": self.seed}
        if "panoptic" in self.kinds:
            categories = [_category_json(c) for c in SYNTHETIC_CATEGORIES]
            data = {"info": info, "images": self.images, "annotations": self.panoptic, "categories": categories}
            self._write_json(f"panoptic_{self.split}.json", data)
        if "instances" in self.kinds:
            categories = [_category_json(c) for c in SYNTHETIC_CATEGORIES if c.isthing]
            data = {"info": info, "images": self.images, "annotations": self.instances, "categories": categories}
            self._write_json(f"instances_{self.split}.json", data)

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        path = self.root / "annotations" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


def _is_thing(category_id: int) -> bool:
    return SYNTHETIC_CATEGORIES[SYNTHETIC_CATEGORIES.id_to_index[category_id]].isthing


def _category_json(category: Category) -> dict[str, Any]:
    return {
        "id": category.id,
        "name": category.name,
        "isthing": int(category.isthing),
        "color": list(category.color),
        "supercategory": "shape" if category.isthing else "texture",
    }


def _panoptic_segment(scene: Scene, segment: SceneSegment) -> dict[str, Any]:
    mask = scene.pan_seg == segment.id
    return {
        "id": segment.id,
        "category_id": segment.category_id,
        "iscrowd": int(segment.iscrowd),
        "area": int(mask.sum()),
        "bbox": _bbox(mask),
    }


def _instance(scene: Scene, segment: SceneSegment, image_id: int, annotation_id: int) -> dict[str, Any]:
    mask = scene.pan_seg == segment.id
    if segment.iscrowd:
        segmentation: Any = _uncompressed_rle(mask)
    elif segment.polygon is not None:
        segmentation = [segment.polygon]
    else:
        segmentation = masks_to_rle(mask[None])[0]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": segment.category_id,
        "iscrowd": int(segment.iscrowd),
        "area": int(mask.sum()),
        "bbox": _bbox(mask),
        "segmentation": segmentation,
    }


def _semantic_labels(scene: Scene) -> np.ndarray:
    labels = np.full(scene.pan_seg.shape, _IGNORE, dtype=np.uint8)
    for segment in scene.segments:
        labels[scene.pan_seg == segment.id] = SYNTHETIC_CATEGORIES.id_to_index[segment.category_id]
    return labels


def _bbox(mask: np.ndarray) -> list[int]:
    """``[x, y, width, height]`` of the mask's pixels (inclusive extents, as COCO panoptic)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}
