from __future__ import annotations

import pytest

from segscope.data.categories import (
    COCO_INSTANCES,
    COCO_PANOPTIC,
    COCO_STUFF,
    Category,
    CategorySet,
    generate_colors,
    get_category_set,
)


def test_coco_panoptic_has_80_things_then_53_stuff() -> None:
    assert len(COCO_PANOPTIC) == 133
    assert COCO_PANOPTIC.thing_indices == tuple(range(80))
    assert COCO_PANOPTIC.stuff_indices == tuple(range(80, 133))


def test_coco_panoptic_anchors_match_panopticapi() -> None:
    assert COCO_PANOPTIC[0] == Category(1, "person", True, (220, 20, 60))
    assert COCO_PANOPTIC[79] == Category(90, "toothbrush", True, (191, 162, 208))
    assert COCO_PANOPTIC[80] == Category(92, "banner", False, (255, 255, 128))
    assert COCO_PANOPTIC[COCO_PANOPTIC.id_to_index[199]].name == "wall-other-merged"
    assert COCO_PANOPTIC[-1] == Category(200, "rug-merged", False, (250, 141, 255))
    assert COCO_PANOPTIC[COCO_PANOPTIC.id_to_index[187]] == Category(187, "sky-other-merged", False, (70, 130, 180))
    assert sum(name.endswith("-merged") for name in COCO_PANOPTIC.names) == 17


def test_coco_instances_are_the_80_panoptic_things_with_detection_ids() -> None:
    assert len(COCO_INSTANCES) == 80
    assert COCO_INSTANCES.categories == COCO_PANOPTIC.categories[:80]
    assert max(COCO_INSTANCES.ids) == 90
    # The ten ids below 90 that COCO detection leaves unused.
    assert set(range(1, 91)) - set(COCO_INSTANCES.ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_coco_stuff_has_80_things_and_91_stuff_with_ids_92_to_182() -> None:
    assert len(COCO_STUFF) == 171
    assert COCO_STUFF.categories[:80] == COCO_INSTANCES.categories
    stuff = [COCO_STUFF[i] for i in COCO_STUFF.stuff_indices]
    assert len(stuff) == 91
    assert [c.id for c in stuff] == list(range(92, 183))
    # Index order is mmseg's train-id order for COCO-Stuff-164k.
    assert (COCO_STUFF[80].name, COCO_STUFF[118].name, COCO_STUFF[170].name) == ("banner", "light", "wood")


def test_coco_stuff_shares_ids_and_colours_with_panoptic_where_names_agree() -> None:
    panoptic = {c.name: c for c in COCO_PANOPTIC}
    shared = [c for c in COCO_STUFF if c.name in panoptic]
    assert len(shared) == 80 + 36
    for category in shared:
        assert (category.id, category.color) == (panoptic[category.name].id, panoptic[category.name].color)


@pytest.mark.parametrize("categories", [COCO_PANOPTIC, COCO_INSTANCES, COCO_STUFF])
def test_ids_names_and_colours_are_unique_within_each_set(categories: CategorySet) -> None:
    assert len(set(categories.ids)) == len(categories)
    assert len(set(categories.names)) == len(categories)
    assert len(set(categories.colors)) == len(categories)
    assert all(categories.id_to_index[cid] == i for i, cid in enumerate(categories.ids))


def test_category_set_views_agree_with_its_categories() -> None:
    assert list(COCO_PANOPTIC) == list(COCO_PANOPTIC.categories)
    assert COCO_PANOPTIC.isthing == tuple(i < 80 for i in range(133))
    assert COCO_PANOPTIC.colors[0] == (220, 20, 60)


def test_get_category_set_accepts_spellings_and_names_the_known_sets() -> None:
    assert get_category_set("coco_panoptic") is COCO_PANOPTIC
    assert get_category_set("COCO-Stuff") is COCO_STUFF
    assert get_category_set("coco_instances") is COCO_INSTANCES
    with pytest.raises(ValueError, match=r"ade20k.*coco_instances"):
        get_category_set("ade20k")


def test_from_names_builds_contiguous_ids_and_distinct_deterministic_colours() -> None:
    names = [f"class {i}" for i in range(300)]
    categories = CategorySet.from_names(names)
    assert categories.ids == tuple(range(300))
    assert categories.names == tuple(names)
    assert all(categories.isthing)
    assert len(set(categories.colors)) == 300
    assert CategorySet.from_names(names).colors == categories.colors
    flagged = CategorySet.from_names(["cat", "sky"], thing_flags=[True, False])
    assert flagged.thing_indices == (0,) and flagged.stuff_indices == (1,)
    with pytest.raises(ValueError, match="2 names but 1 thing flags"):
        CategorySet.from_names(["cat", "sky"], thing_flags=[True])


def test_generate_colors_avoids_the_given_colours() -> None:
    first = generate_colors(3)
    assert set(generate_colors(3, avoid=first)).isdisjoint(first)


def test_invalid_categories_are_refused() -> None:
    with pytest.raises(ValueError, match=r"repeated: \[1\]"):
        CategorySet((Category(1, "a", True, (0, 0, 0)), Category(1, "b", True, (1, 1, 1))))
    with pytest.raises(ValueError, match="at least one"):
        CategorySet(())
    with pytest.raises(ValueError, match="three values in 0-255"):
        Category(1, "a", True, (0, 0, 256))


def test_category_colour_lists_become_tuples() -> None:
    assert Category(1, "a", True, [1, 2, 3]).color == (1, 2, 3)  # type: ignore[arg-type]
