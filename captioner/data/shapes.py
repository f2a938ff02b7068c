"""Procedural shapes scenes: images, reference captions and the ground truth behind them.

Every sample is a pure function of (seed, split, index), so any number of samples exists
without files. The ground truth (each object's attributes and pixel box, and which caption
words refer to which object) makes caption correctness and attention grounding measurable.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from captioner.core.errors import ConfigError
from captioner.core.images import image_size_pair
from captioner.core.tokenizer import split_words

MAX_CAPTIONS = 100  # distinct references a scene can be described by, at most
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.5, "large": 0.8}  # object side as a fraction of a cell
BACKGROUND = (30, 30, 30)
MARGIN = 1  # pixels kept free at each cell edge: objects in different cells never touch

# Phrases for "A <relation> B"; the first is the most common wording.
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
# The opening words tell which way a caption runs, so a caption's next object always follows
# from the words before it: reading order, or (a quarter of references) its reverse.
TEMPLATES = {"reading": ("{}",), "reversed": ("there is {}",)}
REVERSED_SHARE = 0.25
CHAIN_JOIN = "which is"  # "A left of B which is above C"
_FILLER = {"a", "there", "is", "which"}  # the words of TEMPLATES and CHAIN_JOIN
_RELATION_WORDS = sorted(
    ((tuple(p.split()), key) for key, ps in RELATIONS.items() for p in ps),
    key=lambda item: -len(item[0]),
)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; `box` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    colour: str
    shape: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)

    def phrase(self) -> list[str]:
        return ["a", self.size, self.colour, self.shape]


def relation_holds(a: ShapeObject, relation: str, b: ShapeObject) -> bool:
    """True when box `a` lies wholly on the `relation` side of box `b` (y grows downwards)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return {
        "left": ax1 <= bx0,
        "right": ax0 >= bx1,
        "above": ay1 <= by0,
        "below": ay0 >= by1,
    }[relation]


@dataclass(frozen=True)
class ParsedCaption:
    """Objects named by a caption, as (size, colour, shape), and (i, relation, j) claims."""

    objects: tuple[tuple[str | None, str | None, str], ...]
    relations: tuple[tuple[int, str, int], ...]
    spans: tuple[tuple[int, int], ...] = ()  # each object's words: words[start:end]


def parse_caption(text: str) -> ParsedCaption | None:
    """Read a caption back into objects and relations; None if it is not in the grammar."""
    return parse_words(split_words(text))


def parse_words(words: list[str]) -> ParsedCaption | None:
    """`parse_caption` on words already split (a caption's tokens)."""
    objects: list[tuple[str | None, str | None, str]] = []
    relations: list[tuple[int, str, int]] = []
    spans: list[tuple[int, int]] = []
    pending: str | None = None
    i = 0
    while i < len(words):
        match = next(
            ((p, key) for p, key in _RELATION_WORDS if tuple(words[i : i + len(p)]) == p), None
        )
        if match is not None:
            if pending is not None or not objects:
                return None
            pending = match[1]
            i += len(match[0])
            continue
        if words[i] in _FILLER:
            i += 1
            continue
        start = i
        size = words[i] if words[i] in SIZES else None
        i += size is not None
        colour = words[i] if i < len(words) and words[i] in COLOURS else None
        i += colour is not None
        if i >= len(words) or words[i] not in SHAPES:
            return None
        if objects and pending is None:
            return None  # two objects with no relation between them
        if pending is not None:
            relations.append((len(objects) - 1, pending, len(objects)))
            pending = None
        objects.append((size, colour, words[i]))
        spans.append((start, i + 1))
        i += 1
    if pending is not None or not objects:
        return None
    return ParsedCaption(tuple(objects), tuple(relations), tuple(spans))


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: its objects, captions and word -> object alignments."""

    objects: tuple[ShapeObject, ...]
    captions: tuple[str, ...]
    # alignments[k][w] is the index of the object that word w of captions[k] names, or -1
    alignments: tuple[tuple[int, ...], ...] = field(repr=False)

    def align(self, words: list[str]) -> list[int]:
        """For each word of a (generated) caption, the index of the object it names, or -1.

        A phrase names an object when its size, colour and shape (those it states) fit exactly
        one object of the scene; words of phrases that fit none, or several, stay -1, and so do
        all words of a caption outside the grammar.
        """
        out = [-1] * len(words)
        parsed = parse_words(words) or ParsedCaption((), ())
        for attributes, (start, end) in zip(parsed.objects, parsed.spans, strict=True):
            fits = [
                k for k, obj in enumerate(self.objects)
                if all(a in (None, b) for a, b in zip(attributes, obj.attributes, strict=True))
            ]  # fmt: skip
            if len(fits) == 1:
                out[start:end] = [fits[0]] * (end - start)
        return out

    def caption_is_correct(self, text: str) -> bool:
        """All objects named exactly once with the right attributes, and every relation true."""
        parsed = parse_caption(text)
        if parsed is None:
            return False
        by_attributes = {obj.attributes: obj for obj in self.objects}
        if Counter(parsed.objects) != Counter(list(by_attributes)):
            return False
        named = [by_attributes[a] for a in parsed.objects]  # type: ignore[index]
        return all(relation_holds(named[i], rel, named[j]) for i, rel, j in parsed.relations)


class ShapesWorld:
    """Samples and draws scenes; the same (split, index) always gives the same scene."""

    SPLITS: ClassVar[dict[str, int]] = {"train": 0, "val": 1, "test": 2, "test_comp": 3}

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        grid: int = 2,
        min_objects: int = 1,
        max_objects: int = 3,
        captions_per_image: int = 5,
        holdout_combos: Sequence[Sequence[str]] = (),
        seed: int = 0,
    ) -> None:
        self.image_size = image_size_pair(image_size)
        self.grid = grid  # objects sit in distinct cells of a grid x grid layout: no retries
        self.min_objects, self.max_objects = min_objects, max_objects
        self.captions_per_image = captions_per_image
        self.seed = seed
        self.holdout = self._check_combos(holdout_combos)
        all_combos = list(itertools.product(COLOURS, SHAPES))
        self.seen_combos = [c for c in all_combos if c not in self.holdout]
        if grid < 1:
            raise ConfigError(f"data.grid must be >= 1, got {grid}.")
        if min(self.image_size) < 8 * grid:
            raise ConfigError(
                f"data.image_size={list(self.image_size)} is too small for a {grid} x {grid} "
                f"layout: use at least {8 * grid} pixels a side or a smaller data.grid."
            )
        if not 1 <= min_objects <= max_objects <= grid * grid:
            raise ConfigError(
                f"need 1 <= data.min_objects <= data.max_objects <= {grid * grid} (the cells of "
                f"data.grid={grid}), got {min_objects} and {max_objects}."
            )
        if max_objects > len(self.seen_combos):
            raise ConfigError(
                f"data.max_objects={max_objects} exceeds the {len(self.seen_combos)} colour-shape "
                "pairs left after data.holdout_combos: lower one of them."
            )
        if not 1 <= captions_per_image <= MAX_CAPTIONS:
            raise ConfigError(
                f"data.captions_per_image must be between 1 and {MAX_CAPTIONS}, got "
                f"{captions_per_image}."
            )
        if not 0 <= seed < 2**63:
            raise ConfigError(f"data.seed must be in [0, 2**63), got {seed}.")
        self._edges = [
            [round(k * side / grid) for k in range(grid + 1)] for side in self.image_size
        ]  # row edges, column edges

    @staticmethod
    def _check_combos(combos: Sequence[Sequence[str]]) -> set[tuple[str, str]]:
        out = set()
        for combo in combos:
            if len(combo) != 2 or combo[0] not in COLOURS or combo[1] not in SHAPES:
                raise ConfigError(
                    f"data.holdout_combos entry {list(combo)} is not [colour, shape]; colours: "
                    f"{', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}."
                )
            out.add((combo[0], combo[1]))
        return out

    def scene(self, split: str, index: int) -> Scene:
        """The scene at `index` of `split`: objects, placements and captions."""
        if split not in self.SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; use one of {list(self.SPLITS)}")
        if split == "test_comp" and not self.holdout:
            raise ConfigError("the compositional test split needs data.holdout_combos to be set.")
        rng = np.random.default_rng([self.seed, self.SPLITS[split], index])
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        pool = self.seen_combos
        combos: list[tuple[str, str]] = []
        if split == "test_comp":  # at least one never-seen colour-shape pair per image
            held = sorted(self.holdout)
            combos.append(held[rng.integers(len(held))])
            pool = [c for c in itertools.product(COLOURS, SHAPES) if c != combos[0]]
        picks = rng.choice(len(pool), size=count - len(combos), replace=False)
        combos += [pool[k] for k in picks]
        cells = rng.choice(self.grid * self.grid, size=count, replace=False)
        objects = tuple(
            self._place(colour, shape, str(rng.choice(list(SIZES))), int(cell), rng)
            for (colour, shape), cell in zip(combos, cells, strict=True)
        )
        captions, alignments = self._describe(objects, rng)
        return Scene(objects, captions, alignments)

    def _place(
        self, colour: str, shape: str, size: str, cell: int, rng: np.random.Generator
    ) -> ShapeObject:
        row_edges, col_edges = self._edges
        r, c = divmod(cell, self.grid)
        cell_h = row_edges[r + 1] - row_edges[r]
        cell_w = col_edges[c + 1] - col_edges[c]
        side = max(3, round(SIZES[size] * (min(cell_h, cell_w) - 2 * MARGIN)))
        y0 = row_edges[r] + MARGIN + int(rng.integers(0, cell_h - 2 * MARGIN - side + 1))
        x0 = col_edges[c] + MARGIN + int(rng.integers(0, cell_w - 2 * MARGIN - side + 1))
        return ShapeObject(colour, shape, size, (x0, y0, x0 + side, y0 + side))

    def _describe(
        self, objects: tuple[ShapeObject, ...], rng: np.random.Generator
    ) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
        """Distinct references: the objects chained in reading order or its reverse, with varied
        relation words and templates ("A left of B" and "B right of A" describe one layout)."""
        height = self.image_size[0]

        def reading_key(k: int) -> tuple[int, int]:  # (layout row, left edge)
            x0, y0, _, y1 = objects[k].box
            return ((y0 + y1) * self.grid // (2 * height), x0)

        reading = sorted(range(len(objects)), key=reading_key)
        captions: dict[str, tuple[int, ...]] = {}
        for _ in range(4 * self.captions_per_image):
            if len(captions) == self.captions_per_image:
                break
            direction = "reversed" if rng.random() < REVERSED_SHARE else "reading"
            order = reading[::-1] if direction == "reversed" else reading
            words: list[str] = []
            align: list[int] = []
            for position, k in enumerate(order):
                if position:
                    prev = objects[order[position - 1]]
                    valid = [r for r in RELATIONS if relation_holds(prev, r, objects[k])]
                    relation = valid[rng.integers(len(valid))]
                    phrases = RELATIONS[relation]
                    phrase = phrases[rng.integers(len(phrases))].split()
                    joiner = CHAIN_JOIN.split() if position > 1 else []
                    words += joiner + phrase
                    align += [-1] * (len(joiner) + len(phrase))
                words += objects[k].phrase()
                align += [-1, k, k, k]
            template = TEMPLATES[direction][rng.integers(len(TEMPLATES[direction]))]
            prefix = template.split()[:-1]  # words before "{}"
            captions.setdefault(" ".join(prefix + words), tuple([-1] * len(prefix) + align))
        return tuple(captions), tuple(captions.values())

    def render(self, scene: Scene) -> np.ndarray:
        """Draw a scene as an (H, W, 3) uint8 array; row 0 is the top of the image."""
        height, width = self.image_size
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            side = x1 - x0
            ys, xs = np.mgrid[0:side, 0:side] + 0.5  # pixel centres inside the box
            if obj.shape == "square":
                mask = np.ones((side, side), dtype=bool)
            elif obj.shape == "circle":
                mask = (ys - side / 2) ** 2 + (xs - side / 2) ** 2 <= (side / 2) ** 2
            else:  # triangle, apex up
                mask = np.abs(xs - side / 2) <= ys / 2
            image[y0:y1, x0:x1][mask] = COLOURS[obj.colour]
        return image


class ShapesDataset(Dataset):
    """`length` scenes of one split, as uint8 image tensors with captions and truth; without
    `render`, the scenes alone (training from stored features: `row` finds the image's)."""

    def __init__(self, world: ShapesWorld, split: str, length: int, render: bool = True) -> None:
        self.world, self.split, self.length, self.render = world, split, length, render

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = self.world.scene(self.split, index)
        sample = {
            "captions": list(scene.captions), "image_id": index, "scene": scene, "row": index,
            "source": f"shapes:{self.split}/{index}",
        }  # fmt: skip
        if self.render:
            image = torch.from_numpy(self.world.render(scene)).permute(2, 0, 1)  # (3, H, W)
            sample["image"] = image
        return sample
