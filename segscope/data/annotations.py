"""Reading and checking COCO annotation JSON (panoptic and instances) into typed records.

Every record is checked once, on load: required keys, types, image ids that exist, category
ids that are declared, ``bbox`` as ``[x, y, w, h]``, the segmentation format, and (instances)
boxes and polygons inside their image, give or take a pixel. The first bad
record raises ``AnnotationError`` naming the file, the record's position (and id) and what
is wrong, e.g. ``panoptic_val.json: annotations[3] (image_id 42): segments_info[1] (id 7):
unknown category_id 999``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from segscope.data.categories import Category, CategorySet, generate_colors
from segscope.errors import AnnotationError, InputNotFoundError

# Panoptic PNGs store a segment id in 24 bits: id = R + 256 G + 256^2 B; 0 is VOID.
MAX_SEGMENT_ID = 256**3 - 1
# How far (pixels) a box or polygon may reach past the image border: COCO's own annotations
# overshoot by fractions of a pixel.
BORDER_TOLERANCE = 1.0


@dataclass(frozen=True)
class ImageInfo:
    """One entry of a COCO ``images`` list."""

    id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class PanopticRecord:
    """One image's panoptic annotation: its PNG's file name and the segments it lists.

    Each segment is a dict with ``id``, ``category_id``, ``iscrowd`` (0/1), ``area`` and
    ``bbox`` ``[x, y, w, h]``.
    """

    image: ImageInfo
    file_name: str
    segments_info: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class InstanceRecord:
    """One image and its instance annotations (dicts with ``id``, ``category_id``,
    ``iscrowd``, ``area``, ``bbox`` and ``segmentation``)."""

    image: ImageInfo
    annotations: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class PanopticAnnotations:
    categories: CategorySet
    records: tuple[PanopticRecord, ...]


@dataclass(frozen=True)
class InstanceAnnotations:
    categories: CategorySet
    records: tuple[InstanceRecord, ...]


def read_json(path: str | Path) -> Any:
    """The parsed content of a JSON file.

    Raises:
        InputNotFoundError: ``path`` does not exist (a ``FileNotFoundError``).
        AnnotationError: the file is not valid JSON (the message gives line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"no such annotation file: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise AnnotationError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from error
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path} is not UTF-8 text: {error}") from error


def load_panoptic_json(path: str | Path) -> PanopticAnnotations:
    """Categories and per-image records of a COCO panoptic JSON, every record checked."""
    source = str(path)
    data = read_json(path)
    _expect_object(data, source)
    categories = _parse_categories(data, source, isthing_required=True)
    images = _parse_images(data, source)
    records: list[PanopticRecord] = []
    annotated: set[int] = set()
    for i, record in enumerate(_get_list(data, "annotations", source)):
        where = f"{source}: annotations[{i}]"
        _expect_object(record, where)
        image_id = _get_int(record, "image_id", where)
        where = f"{where} (image_id {image_id})"
        if image_id not in images:
            _fail(where, "image_id is not in the 'images' list")
        if image_id in annotated:
            _fail(where, "a second annotation for the same image")
        annotated.add(image_id)
        file_name = _get_str(record, "file_name", where)
        segments = _get_list(record, "segments_info", where)
        records.append(
            PanopticRecord(images[image_id], file_name, _parse_segments(segments, categories, where))
        )
    return PanopticAnnotations(categories, tuple(records))


def load_instances_json(path: str | Path) -> InstanceAnnotations:
    """Categories and per-image records of a COCO instances JSON, every record checked.

    Every image of the ``images`` list gets a record, with or without annotations.
    """
    source = str(path)
    data = read_json(path)
    _expect_object(data, source)
    categories = _parse_categories(data, source, isthing_required=False)
    images = _parse_images(data, source)
    per_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    seen_ids: set[int] = set()
    for i, record in enumerate(_get_list(data, "annotations", source)):
        where = f"{source}: annotations[{i}]"
        _expect_object(record, where)
        annotation_id = _get_int(record, "id", where)
        where = f"{where} (id {annotation_id})"
        if annotation_id in seen_ids:
            _fail(where, "duplicate annotation id")
        seen_ids.add(annotation_id)
        image_id = _get_int(record, "image_id", where)
        if image_id not in images:
            _fail(where, f"image_id {image_id} is not in the 'images' list")
        image = images[image_id]
        per_image[image_id].append(
            {
                "id": annotation_id,
                "category_id": _get_category(record, categories, where),
                "iscrowd": int(_get_flag(record, "iscrowd", where)),
                "area": _get_number(record, "area", where, minimum=0.0),
                "bbox": _check_inside(_get_bbox(record, where), image, where),
                "segmentation": _check_segmentation(_get(record, "segmentation", where), image, where),
            }
        )
    records = tuple(InstanceRecord(image, tuple(per_image[image.id])) for image in images.values())
    return InstanceAnnotations(categories, records)


def check_segments_listed(
    present_ids: Iterable[int],
    segments: Iterable[Mapping[str, Any]],
    what: str,
    list_name: str = "segments_info",
    error: type[Exception] = AnnotationError,
) -> None:
    """Raise ``error`` when a panoptic map holds a non-zero id that its segment list does not name.

    Args:
        present_ids: the distinct ids of the map (``np.unique`` of it); 0 is VOID.
        segments: the map's segment records, each with an ``"id"``.
        what: the map as the message names it (e.g. its PNG file).
        list_name: the segment list as the message names it.

    Unnamed pixels would otherwise pass silently: as VOID, or (panopticapi, ground truth) as
    neither VOID nor a segment.
    """
    listed = {int(segment["id"]) for segment in segments}
    unlisted = sorted({int(i) for i in present_ids} - listed - {0})
    if unlisted:
        raise error(f"{what} holds segment id(s) {unlisted[:10]} that {list_name} does not list")


def _parse_categories(data: Mapping[str, Any], source: str, isthing_required: bool) -> CategorySet:
    """Categories in file order; a missing ``color`` gets a generated one (``isthing``
    defaults to true where the format has no such field, as in instances JSON)."""
    records = _get_list(data, "categories", source)
    if not records:
        _fail(source, "the 'categories' list is empty")
    rows: list[tuple[int, str, bool, tuple[int, int, int] | None]] = []
    seen: set[int] = set()
    for i, record in enumerate(records):
        where = f"{source}: categories[{i}]"
        _expect_object(record, where)
        category_id = _get_int(record, "id", where)
        where = f"{where} (id {category_id})"
        if category_id in seen:
            _fail(where, "duplicate category id")
        seen.add(category_id)
        name = _get_str(record, "name", where)
        if isthing_required or "isthing" in record:
            isthing = _get_flag(record, "isthing", where)
        else:
            isthing = True
        rows.append((category_id, name, isthing, _get_color(record, where)))
    given = [color for *_, color in rows if color is not None]
    generated = iter(generate_colors(len(rows) - len(given), avoid=given))
    return CategorySet(
        tuple(Category(cid, name, thing, color or next(generated)) for cid, name, thing, color in rows)
    )


def _parse_images(data: Mapping[str, Any], source: str) -> dict[int, ImageInfo]:
    images: dict[int, ImageInfo] = {}
    for i, record in enumerate(_get_list(data, "images", source)):
        where = f"{source}: images[{i}]"
        _expect_object(record, where)
        image_id = _get_int(record, "id", where)
        where = f"{where} (id {image_id})"
        if image_id in images:
            _fail(where, "duplicate image id")
        images[image_id] = ImageInfo(
            id=image_id,
            file_name=_get_str(record, "file_name", where),
            height=_get_int(record, "height", where, minimum=1),
            width=_get_int(record, "width", where, minimum=1),
        )
    return images


def _parse_segments(segments: list[Any], categories: CategorySet, where: str) -> tuple[dict[str, Any], ...]:
    parsed: list[dict[str, Any]] = []
    seen: set[int] = set()
    for j, segment in enumerate(segments):
        at = f"{where}: segments_info[{j}]"
        _expect_object(segment, at)
        segment_id = _get_int(segment, "id", at, minimum=1)
        at = f"{at} (id {segment_id})"
        if segment_id > MAX_SEGMENT_ID:
            _fail(at, f"segment id must fit in 24 bits (<= {MAX_SEGMENT_ID})")
        if segment_id in seen:
            _fail(at, "duplicate segment id in this image")
        seen.add(segment_id)
        parsed.append(
            {
                "id": segment_id,
                "category_id": _get_category(segment, categories, at),
                "iscrowd": int(_get_flag(segment, "iscrowd", at)),
                "area": _get_number(segment, "area", at, minimum=0.0),
                "bbox": _get_bbox(segment, at),
            }
        )
    return tuple(parsed)


def _check_segmentation(value: Any, image: ImageInfo, where: str) -> Any:
    """``value`` unchanged if it is polygons, uncompressed RLE or compressed RLE for this image."""
    if isinstance(value, list):
        if not value:
            _fail(where, "'segmentation' is an empty list of polygons")
        for k, polygon in enumerate(value):
            # pycocotools reads a 4-number list as a box, so a polygon needs 3 points or more.
            if (
                not isinstance(polygon, list)
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(_is_number(v) for v in polygon)
            ):
                _fail(where, f"segmentation polygon {k} must be a flat list of >= 6 numbers (x, y pairs)")
            xs, ys = polygon[0::2], polygon[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            _check_inside(box, image, where, f"segmentation polygon {k}")
        return value
    if isinstance(value, dict):
        size, counts = value.get("size"), value.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            _fail(where, f"RLE 'size' must be [height, width], got {size!r}")
        if size != [image.height, image.width]:
            _fail(where, f"RLE size {size} differs from the image's [height, width] {[image.height, image.width]}")
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                _fail(where, "uncompressed RLE 'counts' must be non-negative integers")
            if sum(counts) != image.height * image.width:
                total = image.height * image.width
                _fail(where, f"uncompressed RLE counts sum to {sum(counts)}, not height * width = {total}")
        elif not isinstance(counts, str):
            _fail(where, f"RLE 'counts' must be a list of integers or a string, got {type(counts).__name__}")
        return value
    _fail(where, f"'segmentation' must be a list of polygons or an RLE dict, got {type(value).__name__}")


def _check_inside(box: list[float], image: ImageInfo, where: str, what: str = "'bbox'") -> list[float]:
    """``box`` ``[x, y, w, h]`` unchanged if it lies in the image, give or take ``BORDER_TOLERANCE``.

    pycocotools clips what lies outside without a word, which changes box and mask AP.
    """
    x, y, w, h = box
    low, right, bottom = -BORDER_TOLERANCE, image.width + BORDER_TOLERANCE, image.height + BORDER_TOLERANCE
    if x < low or y < low or x + w > right or y + h > bottom:
        _fail(
            where,
            f"{what} spans x {x:g}..{x + w:g}, y {y:g}..{y + h:g}, outside the {image.width}x{image.height} "
            f"image (file {image.file_name})",
        )
    return box


def _fail(where: str, problem: str) -> NoReturn:
    raise AnnotationError(f"{where}: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _expect_object(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        _fail(where, f"must be a JSON object, got {type(value).__name__}")


def _get(record: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in record:
        _fail(where, f"missing required key {key!r}")
    return record[key]


def _get_int(record: Mapping[str, Any], key: str, where: str, minimum: int | None = None) -> int:
    value = _get(record, key, where)
    if not _is_int(value):
        _fail(where, f"{key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(where, f"{key!r} must be >= {minimum}, got {value}")
    return value


def _get_number(record: Mapping[str, Any], key: str, where: str, minimum: float | None = None) -> float:
    value = _get(record, key, where)
    if not _is_number(value):
        _fail(where, f"{key!r} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(where, f"{key!r} must be >= {minimum}, got {value}")
    return value


def _get_str(record: Mapping[str, Any], key: str, where: str) -> str:
    value = _get(record, key, where)
    if not isinstance(value, str) or not value:
        _fail(where, f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _get_list(record: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = _get(record, key, where)
    if not isinstance(value, list):
        _fail(where, f"{key!r} must be a list, got {type(value).__name__}")
    return value


def _get_flag(record: Mapping[str, Any], key: str, where: str) -> bool:
    value = _get(record, key, where)
    if value not in (0, 1) or not isinstance(value, (int, bool)):
        _fail(where, f"{key!r} must be 0 or 1, got {value!r}")
    return bool(value)


def _get_category(record: Mapping[str, Any], categories: CategorySet, where: str) -> int:
    category_id = _get_int(record, "category_id", where)
    if category_id not in categories.id_to_index:
        _fail(where, f"unknown category_id {category_id} (not in the 'categories' list)")
    return category_id


def _get_bbox(record: Mapping[str, Any], where: str) -> list[float]:
    bbox = _get(record, "bbox", where)
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        _fail(where, f"'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        _fail(where, f"'bbox' width and height must be >= 0, got {bbox!r}")
    return list(bbox)


def _get_color(record: Mapping[str, Any], where: str) -> tuple[int, int, int] | None:
    if "color" not in record:
        return None
    color = record["color"]
    if not (isinstance(color, list) and len(color) == 3 and all(_is_int(c) and 0 <= c <= 255 for c in color)):
        _fail(where, f"'color' must be 3 integers in 0-255, got {color!r}")
    return (color[0], color[1], color[2])
