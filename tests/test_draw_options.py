"""Drawing options: opacity, captions, scores, boxes, font size, and shades per instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import segscope
from segscope.cli import main
from segscope.data.categories import CategorySet
from segscope.errors import OptionError
from segscope.results import SegmentationResult
from segscope.visualize import DrawStyle, draw_segmentation, font_size_for, instance_colors

CATEGORIES = CategorySet.from_names(["disc", "square", "grass", "sky"], thing_flags=[True, True, False, False])
GRAY = 100


def _panoptic(height: int = 96, width: int = 128) -> SegmentationResult:
    """Two discs (segments 1, 2) over sky (segment 3) on a gray image."""
    ys, xs = np.mgrid[:height, :width]
    seg = np.full((height, width), 3, np.int32)
    radius = min(height, width) // 5
    seg[(ys - height // 2) ** 2 + (xs - width // 4) ** 2 < radius**2] = 1
    seg[(ys - height // 2) ** 2 + (xs - 3 * width // 4) ** 2 < radius**2] = 2
    infos = [
        {"id": 1, "label": "disc", "label_id": 0, "category_id": CATEGORIES[0].id, "isthing": True, "score": 0.9},
        {"id": 2, "label": "disc", "label_id": 0, "category_id": CATEGORIES[0].id, "isthing": True, "score": 0.8},
        {"id": 3, "label": "sky", "label_id": 3, "category_id": CATEGORIES[3].id, "isthing": False, "score": 0.7},
    ]
    for info in infos:
        info["area"] = int((seg == info["id"]).sum())
    return SegmentationResult(
        task="panoptic",
        image=np.full((height, width, 3), GRAY, np.uint8),
        masks=np.stack([seg == info["id"] for info in infos]),
        labels=[info["label"] for info in infos],
        label_ids=np.array([info["label_id"] for info in infos]),
        scores=np.array([info["score"] for info in infos], np.float32),
        categories=CATEGORIES,
        panoptic_seg=seg,
        segments_info=infos,
    )


def _instances() -> SegmentationResult:
    masks = np.zeros((2, 64, 96), bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 35:60, 50:90] = True
    return SegmentationResult(
        task="instance",
        image=np.full((64, 96, 3), GRAY, np.uint8),
        masks=masks,
        labels=["square", "square"],
        label_ids=np.array([1, 1]),
        scores=np.array([0.9, 0.6], np.float32),
        categories=CATEGORIES,
        boxes=np.array([[10, 10, 39, 29], [50, 35, 89, 59]], np.float32),
    )


def _edges(seg: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another value: where contours are drawn."""
    edge = np.zeros(seg.shape, bool)
    edge[1:] |= seg[1:] != seg[:-1]
    edge[:-1] |= seg[1:] != seg[:-1]
    edge[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    edge[:, :-1] |= seg[:, 1:] != seg[:, :-1]
    return edge


def test_alpha_zero_without_labels_changes_only_contours() -> None:
    result = _panoptic()
    pixels = np.asarray(result.draw(style=DrawStyle(alpha=0.0, labels=False)))
    changed = np.any(pixels != result.image, axis=2)
    edges = _edges(result.panoptic_seg)
    assert changed[edges].all() and not changed[~edges].any()


def test_alpha_one_paints_the_segment_colour() -> None:
    result = _panoptic()
    pixels = np.asarray(result.draw(style=DrawStyle(alpha=1.0, labels=False)))
    assert tuple(pixels[2, 2]) == CATEGORIES[3].color  # sky, away from contours


def test_no_labels_leaves_no_caption_pixels() -> None:
    result = _panoptic()
    seg = result.panoptic_seg
    inside = ~_edges(seg)
    for labels, expect_uniform in ((False, True), (True, False)):
        pixels = np.asarray(result.draw(style=DrawStyle(labels=labels)))
        # Away from contours, a segment with no caption is one blended colour throughout.
        uniform = all(len(np.unique(pixels[(seg == k) & inside], axis=0)) == 1 for k in (1, 2, 3))
        assert uniform == expect_uniform


def test_no_scores_changes_only_the_captions() -> None:
    result = _panoptic()
    with_scores = np.asarray(result.draw())
    without = np.asarray(result.draw(style=DrawStyle(scores=False)))
    plain = np.asarray(result.draw(style=DrawStyle(labels=False)))
    differs = np.any(with_scores != without, axis=2)
    assert differs.any() and (np.any(with_scores != plain, axis=2) | ~differs).all()
    assert np.array_equal(without, np.asarray(result.draw(show_scores=False)))


def test_boxes_are_drawn_at_the_box_edges() -> None:
    result = _panoptic()
    rows, cols = np.nonzero(result.panoptic_seg == 1)
    top, left = rows.min(), cols.min()  # the box's corner lies outside the disc, on sky
    colors = instance_colors([CATEGORIES[i].color for i in result.label_ids], result.label_ids)
    boxed = np.asarray(result.draw(style=DrawStyle(labels=False, boxes=True)))
    plain = np.asarray(result.draw(style=DrawStyle(labels=False)))
    assert tuple(boxed[top, left]) == colors[0] and tuple(plain[top, left]) != colors[0]
    assert tuple(boxed[rows.max(), cols.max()]) == colors[0]
    # Instances draw their boxes unless told not to.
    instances = _instances()
    colors = instance_colors([CATEGORIES[1].color] * 2, [1, 1])
    assert tuple(np.asarray(instances.draw(style=DrawStyle(labels=False)))[20, 10]) == colors[0]
    unboxed = np.asarray(instances.draw(style=DrawStyle(labels=False, boxes=False)))
    assert tuple(unboxed[40, 50]) != colors[1]  # the second box's left edge, inside its mask: blended only


def test_instances_of_one_class_get_distinct_shades_of_its_colour() -> None:
    colors = instance_colors([(220, 20, 60)] * 3 + [(0, 0, 142)], [0, 0, 0, 5])
    assert colors[0] == (220, 20, 60) and colors[3] == (0, 0, 142)
    assert len(set(colors[:3])) == 3
    assert len(set(instance_colors([(255, 255, 255)] * 20, [0] * 20))) == 20
    pixels = np.asarray(_panoptic().draw(style=DrawStyle(labels=False)))
    assert tuple(pixels[48, 32]) != tuple(pixels[48, 96])  # the two discs' centres


def test_font_grows_with_the_image() -> None:
    assert font_size_for(64, 80) == 12 and font_size_for(1080, 1920) == 27

    def caption_height(size: int) -> int:
        seg = np.zeros((size, size), np.int32)
        image = np.full((size, size, 3), GRAY, np.uint8)
        labelled = np.asarray(draw_segmentation(image, seg, [(0, "disc", None)], [(255, 0, 0)]))
        plain = np.asarray(draw_segmentation(image, seg, [(0, "disc", None)], [(255, 0, 0)], captions=False))
        rows = np.nonzero(np.any(labelled != plain, axis=(1, 2)))[0]
        return int(rows.max() - rows.min() + 1)

    assert caption_height(1200) > 1.8 * caption_height(200)
    small = np.asarray(_panoptic().draw(style=DrawStyle(font_size=8)))
    large = np.asarray(_panoptic().draw(style=DrawStyle(font_size=20)))
    assert not np.array_equal(small, large)


def test_bad_style_values_are_refused() -> None:
    with pytest.raises(OptionError, match="alpha"):
        DrawStyle(alpha=1.5)
    with pytest.raises(OptionError, match="font size"):
        DrawStyle(font_size=0)


def test_cli_drawing_options_reach_the_overlay(tiny_checkpoint: Path, picture: Path, tmp_path: Path) -> None:
    args = ["predict", str(picture), "-m", str(tiny_checkpoint), "--device", "cpu", "-f", "overlay"]
    assert main([*args, "-o", str(tmp_path / "a"), "--alpha", "0", "--no-labels"]) == 0
    overlay = np.asarray(Image.open(tmp_path / "a" / "picture.png").convert("RGB"))
    result = segscope.pipeline(model=str(tiny_checkpoint), device="cpu")(picture)
    changed = np.any(overlay != result.image, axis=2)
    assert not changed[~_edges(result.panoptic_seg)].any()
    assert main([*args, "-o", str(tmp_path / "b"), "--alpha", "2"]) == 2
