"""The grounding metric: word-object alignment of generated captions, pointing and mass."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from captioner.data import ShapesWorld
from captioner.metrics.grounding import GroundingMeter, box_coverage, grounding_loss


def test_alignment_of_a_caption_matches_the_datasets_own() -> None:
    world = ShapesWorld(64, min_objects=1, max_objects=3)
    checked = 0
    for index in range(100):
        scene = world.scene("test", index)
        for caption, alignment in zip(scene.captions, scene.alignments, strict=True):
            assert tuple(scene.align(caption.split())) == alignment
            checked += 1
    assert checked > 300


def test_alignment_leaves_unknown_and_ambiguous_objects_unaligned() -> None:
    world = ShapesWorld(64, min_objects=2, max_objects=2)
    scene = next(s for i in range(50) if (s := world.scene("test", i)).objects[0].shape != "circle"
                 and all(o.shape != "circle" for o in s.objects))  # fmt: skip
    size, colour, shape = scene.objects[0].attributes
    words = ["a", size, colour, shape, "above", "a", "small", "red", "circle"]
    assert scene.align(words)[:4] == [-1, 0, 0, 0] and scene.align(words)[4:] == [-1] * 5
    assert scene.align(["a", "green", "green"]) == [-1, -1, -1]  # outside the grammar


def test_box_coverage_counts_area_and_centres() -> None:
    coverage, inside = box_coverage((4, 0, 12, 8), (2, 3), patch_size=8)
    assert coverage.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    assert inside.tolist() == [[True, False, False], [False, False, False]]


def test_pointing_and_mass_follow_the_attention() -> None:
    """Head 0 looks at the object's patch, head 1 elsewhere: the head mean still points there
    (0.6 vs 0.4), and every view's mass is the share on the box."""
    attention = torch.zeros(2, 2, 3, 2, 3)  # (L, H, T, grid 2 x 3)
    attention[:, 0, :, 1, 2] = 1.0  # the box's patch
    attention[:, 1, :, 0, 0] = 0.8
    attention[:, 1, :, 1, 2] = 0.2
    attention[1] = attention[1].roll(1, dims=-1)  # layer 1 looks one patch to the right
    meter = GroundingMeter(patch_size=8)
    meter.update(attention, alignment=[-1, 0, 0], boxes=[(16, 8, 24, 16)])  # patch (1, 2)
    out = meter.compute()
    assert out["grounding/words"] == 2
    assert out["grounding/pointing_acc/layer0_head0"] == 1.0
    assert out["grounding/pointing_acc/layer0_head1"] == 0.0
    assert out["grounding/pointing_acc/layer0"] == 1.0  # head mean: 0.6 on the box
    assert out["grounding/mass/layer0"] == pytest.approx(0.6)
    assert out["grounding/pointing_acc/layer1"] == 0.0
    assert out["grounding/pointing_acc"] == 1.0 and out["grounding/best_layer"] == 0
    assert out["grounding/mass/mean"] == pytest.approx(0.3)


def test_grounding_loss_is_minus_log_mass_on_the_named_box() -> None:
    """Batch of 1, two tokens over a 2 x 2 grid: token 0 names an object covering patch 0,
    token 1 names nothing. Layer 0 puts everything there, layer 1 spreads evenly."""
    on_box = torch.tensor([1.0, 0.0, 0.0, 0.0])
    layer0 = torch.stack([on_box, torch.full((4,), 0.25)])[None, None]  # (1, 1, T=2, 4)
    layer1 = torch.full((1, 1, 2, 4), 0.25)
    targets = torch.stack([on_box, torch.zeros(4)])[None]  # (1, 2, 4)
    loss = grounding_loss([layer0, layer1], targets)
    assert loss.item() == pytest.approx(-(math.log(1.0) + math.log(0.25)) / 2)
    assert grounding_loss([layer1], torch.zeros(1, 2, 4)).item() == 0.0  # nothing named


def test_batched_box_coverage_matches_one_box_at_a_time() -> None:
    boxes = torch.tensor([[[4, 0, 12, 8], [0, 0, 0, 0]], [[3, 5, 20, 16], [0, 9, 24, 16]]])
    coverage, inside = box_coverage(boxes, (2, 3), patch_size=8)
    assert coverage.shape == (2, 2, 2, 3)
    for index in itertools.product(range(2), range(2)):
        one = box_coverage(boxes[index].tolist(), (2, 3), patch_size=8)
        assert torch.equal(coverage[index], one[0]) and torch.equal(inside[index], one[1])
    assert coverage[0, 1].sum() == 0  # a zero box covers nothing
