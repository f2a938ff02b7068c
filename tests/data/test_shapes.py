"""The procedural shapes data: determinism, layout, captions, ground truth and the parser."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from captioner.core.errors import ConfigError
from captioner.core.tokenizer import split_words
from captioner.data.shapes import (
    COLOURS,
    MARGIN,
    TEMPLATES,
    Scene,
    ShapeObject,
    ShapesDataset,
    ShapesWorld,
    parse_caption,
    relation_holds,
)


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(image_size=64, max_objects=3, holdout_combos=[["red", "circle"]], seed=3)


def test_same_index_same_sample(world: ShapesWorld) -> None:
    again = ShapesWorld(image_size=64, max_objects=3, holdout_combos=[["red", "circle"]], seed=3)
    for index in range(20):
        a, b = world.scene("train", index), again.scene("train", index)
        assert a == b
        assert np.array_equal(world.render(a), again.render(b))
    different = [
        world.scene("train", i).objects != world.scene("val", i).objects for i in range(20)
    ]
    assert sum(different) >= 18
    other_seed = ShapesWorld(image_size=64, seed=4)
    assert world.scene("train", 0).objects != other_seed.scene("train", 0).objects


def gap(a: ShapeObject, b: ShapeObject) -> int:
    """Pixels of free space between two boxes along the axis where they are apart."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


@pytest.mark.parametrize(("image_size", "grid"), [(64, 2), (64, 3), ((48, 96), 3), (24, 3)])
def test_objects_never_overlap_even_when_the_image_is_full(
    image_size: int | tuple, grid: int
) -> None:
    full = grid * grid  # every cell used
    world = ShapesWorld(image_size=image_size, grid=grid, min_objects=full, max_objects=full)
    height, width = world.image_size
    for index in range(50):
        scene = world.scene("train", index)
        assert len(scene.objects) == full
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        for a, b in itertools.combinations(scene.objects, 2):
            assert gap(a, b) >= 2 * MARGIN


def test_render_matches_the_ground_truth(world: ShapesWorld) -> None:
    for index in range(30):
        scene = world.scene("test", index)
        image = world.render(scene)
        painted = np.any(image != image[0, 0], axis=-1)  # (H, W), background is uniform
        inside = np.zeros_like(painted)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            inside[y0:y1, x0:x1] = True
            centre = image[(y0 + y1) // 2, (x0 + x1) // 2]
            assert tuple(centre) == COLOURS[obj.colour]  # every shape covers its box centre
        assert not np.any(painted & ~inside)  # nothing is drawn outside the boxes


def test_every_reference_is_correct_and_varied(world: ShapesWorld) -> None:
    orders = 0
    for index in range(200):
        scene = world.scene("train", index)
        assert len(set(scene.captions)) == len(scene.captions) >= 1
        for caption in scene.captions:
            assert scene.caption_is_correct(caption), caption
        if len(scene.objects) > 1:
            first_nouns = {split_words(c)[split_words(c).index("a") + 3] for c in scene.captions}
            orders += len(first_nouns) > 1
    assert orders > 50  # objects are described in more than one order


def test_opening_words_tell_the_object_order(world: ShapesWorld) -> None:
    """Reading order unless the caption opens with the reversed template: never ambiguous."""
    for index in range(200):
        scene = world.scene("train", index)
        for caption, alignment in zip(scene.captions, scene.alignments, strict=True):
            named = [a for a in alignment if a >= 0][::3]  # object index, once per object
            rows = [(scene.objects[k].box[1] + scene.objects[k].box[3]) // 64 for k in named]
            keys = [(r, scene.objects[k].box[0]) for r, k in zip(rows, named, strict=True)]
            if caption.startswith(TEMPLATES["reversed"][0].removesuffix("{}")):
                keys = keys[::-1]
            assert keys == sorted(keys), caption


def test_word_to_object_alignment(world: ShapesWorld) -> None:
    for index in range(100):
        scene = world.scene("train", index)
        for caption, alignment in zip(scene.captions, scene.alignments, strict=True):
            words = split_words(caption)
            assert len(words) == len(alignment)
            for k, obj in enumerate(scene.objects):
                named = [w for w, a in zip(words, alignment, strict=True) if a == k]
                assert named == [obj.size, obj.colour, obj.shape]
            unaligned = {w for w, a in zip(words, alignment, strict=True) if a < 0}
            assert not unaligned & {"red", "green", "blue", "circle", "square", "triangle"}


def two_objects() -> Scene:
    left = ShapeObject("red", "circle", "small", (2, 2, 12, 12))
    right = ShapeObject("blue", "square", "large", (30, 20, 46, 36))
    return Scene((left, right), ("a small red circle left of a large blue square",), ((),))


@pytest.mark.parametrize(
    ("caption", "correct"),
    [
        ("a small red circle left of a large blue square", True),
        ("there is a large blue square to the right of a small red circle", True),
        ("a large blue square below a small red circle", True),
        ("a small red circle above a large blue square", True),
        ("a small red circle right of a large blue square", False),  # wrong relation
        ("a large red circle left of a large blue square", False),  # wrong size
        ("a small green circle left of a large blue square", False),  # wrong colour
        ("a small red circle", False),  # an object is missing
        (
            "a small red circle left of a large blue square which is left of a small red circle",
            False,
        ),  # an object named twice
        ("a small red circle a large blue square", False),  # no relation
        ("a small red circle left of", False),  # dangling relation
        ("a small red dog left of a large blue square", False),  # not in the grammar
        ("an image of a small red circle left of a large blue square", False),  # nor is this
        ("", False),
    ],
)
def test_parser_judges_captions(caption: str, correct: bool) -> None:
    assert two_objects().caption_is_correct(caption) is correct


def test_parser_reads_objects_and_relations() -> None:
    parsed = parse_caption("there is a small red circle to the left of a large blue square "
                           "which is under a small green triangle")  # fmt: skip
    assert parsed is not None
    assert parsed.objects == (
        ("small", "red", "circle"), ("large", "blue", "square"), ("small", "green", "triangle"),
    )  # fmt: skip
    assert parsed.relations == ((0, "left", 1), (1, "below", 2))


def test_relations_follow_image_coordinates() -> None:
    top_left = ShapeObject("red", "circle", "small", (0, 0, 10, 10))
    bottom_right = ShapeObject("blue", "square", "small", (20, 20, 30, 30))
    assert relation_holds(top_left, "left", bottom_right)
    assert relation_holds(top_left, "above", bottom_right)  # row 0 is the top
    assert not relation_holds(top_left, "below", bottom_right)


def test_compositional_split(world: ShapesWorld) -> None:
    for index in range(300):
        for split in ("train", "val", "test"):
            combos = {(o.colour, o.shape) for o in world.scene(split, index).objects}
            assert ("red", "circle") not in combos
        held = {(o.colour, o.shape) for o in world.scene("test_comp", index).objects}
        assert ("red", "circle") in held


def test_dataset_items(world: ShapesWorld) -> None:
    data = ShapesDataset(world, "val", 5)
    item = data[4]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype.is_floating_point is False
    assert item["captions"] == list(item["scene"].captions) and item["image_id"] == 4
    with pytest.raises(IndexError):
        data[5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"holdout_combos": [["pink", "circle"]]}, "data.holdout_combos"),
        ({"max_objects": 10}, "data.max_objects"),
        ({"min_objects": 3, "max_objects": 2}, "data.min_objects"),
        ({"image_size": 12}, "data.image_size"),
        ({"grid": 0}, "data.grid"),
        ({"captions_per_image": 0}, "data.captions_per_image"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShapesWorld(**kwargs)


def test_comp_split_needs_holdout() -> None:
    with pytest.raises(ConfigError, match="holdout_combos"):
        ShapesWorld().scene("test_comp", 0)
