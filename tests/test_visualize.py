from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segscope.visualize import draw_instances, draw_segmentation, save_png

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _gray(height: int = 64, width: int = 96, value: int = 100) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def _two_segments() -> np.ndarray:
    """Left half segment 7, right half segment 3, a top-left 8x8 corner of unlisted value 99."""
    seg = np.full((64, 96), 3, np.int32)
    seg[:, :48] = 7
    seg[:8, :8] = 99
    return seg


def test_segments_are_blended_with_their_colour_and_unlisted_pixels_kept() -> None:
    picture = draw_segmentation(_gray(), _two_segments(), [(7, "cat", 0.9), (3, "sky", None)], [RED, BLUE])
    assert picture.mode == "RGB" and picture.size == (96, 64)
    pixels = np.asarray(picture)
    # 0.5 * 100 + 0.5 * colour, away from contours (x = 47, 48) and labels (segment centres).
    assert tuple(pixels[60, 20]) == (178, 50, 50)
    assert tuple(pixels[60, 90]) == (50, 50, 178)
    assert tuple(pixels[2, 2]) == (100, 100, 100)


def test_segment_borders_are_outlined_in_a_darker_shade() -> None:
    pixels = np.asarray(draw_segmentation(_gray(), _two_segments(), [(7, "cat", None), (3, "sky", None)], [RED, BLUE]))
    assert tuple(pixels[60, 47]) == (153, 0, 0)
    assert tuple(pixels[60, 48]) == (0, 0, 153)


def test_each_segment_gets_a_caption_inside_it() -> None:
    seg = _two_segments()
    plain = np.asarray(draw_segmentation(_gray(), seg, [(7, "", None), (3, "", None)], [RED, BLUE]))
    labelled = np.asarray(draw_segmentation(_gray(), seg, [(7, "cat", 0.9), (3, "sky", None)], [RED, BLUE]))
    changed = np.any(plain != labelled, axis=2)
    assert changed[:, :48].any() and changed[:, 48:].any()
    # Captions are centred on the point deepest inside each segment, away from its borders.
    rows, cols = np.nonzero(changed[:, 48:])
    assert abs(rows.mean() - 32) < 8 and abs(cols.mean() + 48 - 72) < 12


def test_semantic_maps_with_class_zero_are_drawn() -> None:
    seg = np.zeros((64, 64), np.int64)
    seg[32:] = 5
    pixels = np.asarray(draw_segmentation(_gray(64, 64), seg, [(0, "wall", None), (5, "floor", None)], [RED, BLUE]))
    assert tuple(pixels[1, 1]) == (178, 50, 50)
    assert tuple(pixels[62, 1]) == (50, 50, 178)


def test_no_segments_leaves_the_image_unchanged() -> None:
    image = _gray()
    np.testing.assert_array_equal(np.asarray(draw_segmentation(image, _two_segments(), [])), image)


def test_draw_segmentation_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="seg_map has shape"):
        draw_segmentation(_gray(), np.zeros((10, 10), np.int32), [])
    with pytest.raises(ValueError, match="2 segments but 1 colors"):
        draw_segmentation(_gray(), _two_segments(), [(7, "a", None), (3, "b", None)], [RED])
    with pytest.raises(ValueError, match="unique"):
        draw_segmentation(_gray(), _two_segments(), [(7, "a", None), (7, "b", None)])


def test_instances_get_masks_boxes_and_captions() -> None:
    image = np.zeros((96, 96, 3), np.uint8)
    masks = np.zeros((2, 96, 96), bool)
    masks[0, 40:80, 10:50] = True
    masks[1, 60:70, 60:90] = True
    boxes = np.array([[10, 40, 49, 79], [60, 60, 89, 69]], np.float32)
    picture = draw_instances(image, masks, boxes, ["dog", "cup"], np.array([0.97, 0.5]), [RED, BLUE])
    assert picture.mode == "RGB" and picture.size == (96, 96)
    pixels = np.asarray(picture)
    assert tuple(pixels[70, 30]) == (128, 0, 0)  # mask, inside the box
    assert tuple(pixels[75, 10]) == RED  # left edge of the box
    assert tuple(pixels[5, 5]) == (0, 0, 0)  # outside everything
    # The caption sits on a box of the instance's colour at the box's top-left corner.
    assert (pixels[40:52, 12:30] == RED).all(axis=2).sum() > 50
    without_scores = np.asarray(draw_instances(image, masks, boxes, ["dog", "cup"], None, [RED, BLUE]))
    assert (without_scores != pixels).any()


def test_draw_instances_refuses_mismatched_counts() -> None:
    with pytest.raises(ValueError, match="expected 2 masks"):
        draw_instances(_gray(), np.zeros((1, 64, 96), bool), np.zeros((2, 4)), ["a", "b"])


def test_empty_instances_leave_the_image_unchanged() -> None:
    image = _gray()
    picture = draw_instances(image, np.zeros((0, 64, 96), bool), np.zeros((0, 4)), [])
    np.testing.assert_array_equal(np.asarray(picture), image)


def test_save_png_creates_folders_and_round_trips(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    path = save_png(image, tmp_path / "a" / "b" / "out.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    path = save_png(Image.fromarray(image), tmp_path / "again.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
