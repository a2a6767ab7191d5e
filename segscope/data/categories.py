"""Category metadata (dataset id, name, thing/stuff, colour) of the datasets segscope knows.

A model predicts contiguous class indices 0..C-1; a ``CategorySet`` maps each index to its
dataset category. Sources of the data:

* COCO panoptic (133): ids, names, isthing and colours of panopticapi's
  ``panoptic_coco_categories.json`` (as in detectron2's ``COCO_CATEGORIES``).
* COCO instances (80): the thing categories of the same list (COCO detection ids 1..90).
* COCO-Stuff-164k (171): the 80 things plus the 91 stuff classes with COCO-Stuff ids 92..182
  (the label PNGs of COCO-Stuff store ``id - 1``; mmseg's train ids are the contiguous
  indices here). Colours: a class named as in COCO panoptic takes its panoptic colour; the
  other 55 stuff classes get generated colours (``generate_colors``), because the palette
  mmseg ships for COCO-Stuff repeats colours (person and bicycle share one).
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

Color = tuple[int, int, int]


@dataclass(frozen=True)
class Category:
    """One dataset category: its dataset ``id``, ``name``, thing or stuff, and display colour."""

    id: int
    name: str
    isthing: bool
    color: Color

    def __post_init__(self) -> None:
        color = tuple(int(c) for c in self.color)
        if len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise ValueError(f"category {self.name!r}: color must be three values in 0-255, got {self.color}")
        object.__setattr__(self, "color", color)


@dataclass(frozen=True)
class CategorySet:
    """The categories a model predicts, in the order of its class indices 0..C-1."""

    categories: tuple[Category, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(self.categories))
        if not self.categories:
            raise ValueError("a CategorySet needs at least one category")
        ids = [c.id for c in self.categories]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"category ids must be unique; repeated: {duplicates}")

    @classmethod
    def from_names(cls, names: Sequence[str], thing_flags: Sequence[bool] | None = None) -> CategorySet:
        """Categories with ids 0..C-1, generated distinct colours, all things unless flagged."""
        if thing_flags is None:
            thing_flags = [True] * len(names)
        if len(thing_flags) != len(names):
            raise ValueError(f"{len(names)} names but {len(thing_flags)} thing flags")
        colors = generate_colors(len(names))
        rows = enumerate(zip(names, thing_flags, colors, strict=True))
        return cls(tuple(Category(i, str(name), bool(thing), color) for i, (name, thing, color) in rows))

    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __getitem__(self, index: int) -> Category:
        return self.categories[index]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    @property
    def ids(self) -> tuple[int, ...]:
        """Dataset id of each class index (index -> id)."""
        return tuple(c.id for c in self.categories)

    @property
    def isthing(self) -> tuple[bool, ...]:
        return tuple(c.isthing for c in self.categories)

    @property
    def colors(self) -> tuple[Color, ...]:
        return tuple(c.color for c in self.categories)

    @property
    def thing_indices(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.categories) if c.isthing)

    @property
    def stuff_indices(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.categories) if not c.isthing)

    @cached_property
    def id_to_index(self) -> dict[int, int]:
        """Class index of each dataset id (id -> index)."""
        return {c.id: i for i, c in enumerate(self.categories)}


def generate_colors(count: int, avoid: Iterable[Color] = ()) -> list[Color]:
    """``count`` distinct, deterministic colours, none of them in ``avoid``.

    Hues step by the golden ratio (successive colours far apart on the wheel); saturation and
    value cycle over a few levels so that long lists stay distinguishable.
    """
    taken = set(avoid)
    colors: list[Color] = []
    step = 0
    while len(colors) < count:
        hue = (step * 0.618033988749895) % 1.0
        saturation = (0.85, 0.6, 0.95)[step % 3]
        value = (0.95, 0.75, 0.6)[(step // 3) % 3]
        color = tuple(round(255 * x) for x in colorsys.hsv_to_rgb(hue, saturation, value))
        if color not in taken:
            taken.add(color)
            colors.append(color)
        step += 1
    return colors


# (id, name, colour): panopticapi's 80 thing categories.
_COCO_THINGS: tuple[tuple[int, str, Color], ...] = (
    (1, "person", (220, 20, 60)), (2, "bicycle", (119, 11, 32)), (3, "car", (0, 0, 142)),
    (4, "motorcycle", (0, 0, 230)), (5, "airplane", (106, 0, 228)), (6, "bus", (0, 60, 100)),
    (7, "train", (0, 80, 100)), (8, "truck", (0, 0, 70)), (9, "boat", (0, 0, 192)),
    (10, "traffic light", (250, 170, 30)), (11, "fire hydrant", (100, 170, 30)),
    (13, "stop sign", (220, 220, 0)), (14, "parking meter", (175, 116, 175)),
    (15, "bench", (250, 0, 30)), (16, "bird", (165, 42, 42)), (17, "cat", (255, 77, 255)),
    (18, "dog", (0, 226, 252)), (19, "horse", (182, 182, 255)), (20, "sheep", (0, 82, 0)),
    (21, "cow", (120, 166, 157)), (22, "elephant", (110, 76, 0)), (23, "bear", (174, 57, 255)),
    (24, "zebra", (199, 100, 0)), (25, "giraffe", (72, 0, 118)), (27, "backpack", (255, 179, 240)),
    (28, "umbrella", (0, 125, 92)), (31, "handbag", (209, 0, 151)), (32, "tie", (188, 208, 182)),
    (33, "suitcase", (0, 220, 176)), (34, "frisbee", (255, 99, 164)), (35, "skis", (92, 0, 73)),
    (36, "snowboard", (133, 129, 255)), (37, "sports ball", (78, 180, 255)),
    (38, "kite", (0, 228, 0)), (39, "baseball bat", (174, 255, 243)),
    (40, "baseball glove", (45, 89, 255)), (41, "skateboard", (134, 134, 103)),
    (42, "surfboard", (145, 148, 174)), (43, "tennis racket", (255, 208, 186)),
    (44, "bottle", (197, 226, 255)), (46, "wine glass", (171, 134, 1)), (47, "cup", (109, 63, 54)),
    (48, "fork", (207, 138, 255)), (49, "knife", (151, 0, 95)), (50, "spoon", (9, 80, 61)),
    (51, "bowl", (84, 105, 51)), (52, "banana", (74, 65, 105)), (53, "apple", (166, 196, 102)),
    (54, "sandwich", (208, 195, 210)), (55, "orange", (255, 109, 65)),
    (56, "broccoli", (0, 143, 149)), (57, "carrot", (179, 0, 194)), (58, "hot dog", (209, 99, 106)),
    (59, "pizza", (5, 121, 0)), (60, "donut", (227, 255, 205)), (61, "cake", (147, 186, 208)),
    (62, "chair", (153, 69, 1)), (63, "couch", (3, 95, 161)), (64, "potted plant", (163, 255, 0)),
    (65, "bed", (119, 0, 170)), (67, "dining table", (0, 182, 199)), (70, "toilet", (0, 165, 120)),
    (72, "tv", (183, 130, 88)), (73, "laptop", (95, 32, 0)), (74, "mouse", (130, 114, 135)),
    (75, "remote", (110, 129, 133)), (76, "keyboard", (166, 74, 118)),
    (77, "cell phone", (219, 142, 185)), (78, "microwave", (79, 210, 114)),
    (79, "oven", (178, 90, 62)), (80, "toaster", (65, 70, 15)), (81, "sink", (127, 167, 115)),
    (82, "refrigerator", (59, 105, 106)), (84, "book", (142, 108, 45)), (85, "clock", (196, 172, 0)),
    (86, "vase", (95, 54, 80)), (87, "scissors", (128, 76, 255)), (88, "teddy bear", (201, 57, 1)),
    (89, "hair drier", (246, 0, 122)), (90, "toothbrush", (191, 162, 208)),
)  # fmt: skip

# (id, name, colour): panopticapi's 53 stuff categories (some merged from COCO-Stuff classes).
_COCO_PANOPTIC_STUFF: tuple[tuple[int, str, Color], ...] = (
    (92, "banner", (255, 255, 128)), (93, "blanket", (147, 211, 203)), (95, "bridge", (150, 100, 100)),
    (100, "cardboard", (168, 171, 172)), (107, "counter", (146, 112, 198)),
    (109, "curtain", (210, 170, 100)), (112, "door-stuff", (92, 136, 89)),
    (118, "floor-wood", (218, 88, 184)), (119, "flower", (241, 129, 0)), (122, "fruit", (217, 17, 255)),
    (125, "gravel", (124, 74, 181)), (128, "house", (70, 70, 70)), (130, "light", (255, 228, 255)),
    (133, "mirror-stuff", (154, 208, 0)), (138, "net", (193, 0, 92)), (141, "pillow", (76, 91, 113)),
    (144, "platform", (255, 180, 195)), (145, "playingfield", (106, 154, 176)),
    (147, "railroad", (230, 150, 140)), (148, "river", (60, 143, 255)), (149, "road", (128, 64, 128)),
    (151, "roof", (92, 82, 55)), (154, "sand", (254, 212, 124)), (155, "sea", (73, 77, 174)),
    (156, "shelf", (255, 160, 98)), (159, "snow", (255, 255, 255)), (161, "stairs", (104, 84, 109)),
    (166, "tent", (169, 164, 131)), (168, "towel", (225, 199, 255)), (171, "wall-brick", (137, 54, 74)),
    (175, "wall-stone", (135, 158, 223)), (176, "wall-tile", (7, 246, 231)),
    (177, "wall-wood", (107, 255, 200)), (178, "water-other", (58, 41, 149)),
    (180, "window-blind", (183, 121, 142)), (181, "window-other", (255, 73, 97)),
    (184, "tree-merged", (107, 142, 35)), (185, "fence-merged", (190, 153, 153)),
    (186, "ceiling-merged", (146, 139, 141)), (187, "sky-other-merged", (70, 130, 180)),
    (188, "cabinet-merged", (134, 199, 156)), (189, "table-merged", (209, 226, 140)),
    (190, "floor-other-merged", (96, 36, 108)), (191, "pavement-merged", (96, 96, 96)),
    (192, "mountain-merged", (64, 170, 64)), (193, "grass-merged", (152, 251, 152)),
    (194, "dirt-merged", (208, 229, 228)), (195, "paper-merged", (206, 186, 171)),
    (196, "food-other-merged", (152, 161, 64)), (197, "building-other-merged", (116, 112, 0)),
    (198, "rock-merged", (0, 114, 143)), (199, "wall-other-merged", (102, 102, 156)),
    (200, "rug-merged", (250, 141, 255)),
)  # fmt: skip

# COCO-Stuff's 91 stuff classes, in id order; their ids run 92..182 without gaps.
_COCO_STUFF_FIRST_ID = 92
_COCO_STUFF_NAMES: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood",
)  # fmt: skip


def _categories(rows: Iterable[tuple[int, str, Color]], isthing: bool) -> tuple[Category, ...]:
    return tuple(Category(cid, name, isthing, color) for cid, name, color in rows)


def _coco_stuff() -> CategorySet:
    things = _categories(_COCO_THINGS, True)
    panoptic_colors = {name: color for _, name, color in _COCO_PANOPTIC_STUFF}
    missing = [name for name in _COCO_STUFF_NAMES if name not in panoptic_colors]
    taken = [*panoptic_colors.values(), *(c.color for c in things)]
    generated = dict(zip(missing, generate_colors(len(missing), avoid=taken), strict=True))
    stuff = tuple(
        Category(_COCO_STUFF_FIRST_ID + i, name, False, panoptic_colors.get(name) or generated[name])
        for i, name in enumerate(_COCO_STUFF_NAMES)
    )
    return CategorySet(things + stuff)


COCO_INSTANCES = CategorySet(_categories(_COCO_THINGS, True))
COCO_PANOPTIC = CategorySet(COCO_INSTANCES.categories + _categories(_COCO_PANOPTIC_STUFF, False))
COCO_STUFF = _coco_stuff()

_REGISTRY: dict[str, CategorySet] = {
    "coco_panoptic": COCO_PANOPTIC,
    "coco_instances": COCO_INSTANCES,
    "coco_stuff": COCO_STUFF,
}


def get_category_set(name: str) -> CategorySet:
    """A known category set by name: "coco_panoptic", "coco_instances" or "coco_stuff"."""
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown category set {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[key]
