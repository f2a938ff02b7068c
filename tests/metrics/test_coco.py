"""The pycocoevalcap wrapper."""

from __future__ import annotations

import pytest

from captioner.metrics import caption_scores

REFS = {
    1: ["a small red circle left of a large blue square", "there is a small red circle"],
    2: ["a large green triangle", "an image of a large green triangle"],
    3: ["a white square above a purple circle"],
}


def test_perfect_predictions_score_high_and_wrong_ones_low() -> None:
    perfect = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    assert set(perfect) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L"):
        assert perfect[name] == pytest.approx(1.0, abs=1e-6)
    assert perfect["METEOR"] > 0.9
    wrong = caption_scores({1: "a dog", 2: "two cats on a sofa", 3: ""}, REFS)
    assert wrong["BLEU-4"] < 0.01 and wrong["CIDEr"] < perfect["CIDEr"]
    assert wrong["METEOR"] < 0.2 and wrong["ROUGE-L"] < 0.3


def test_meteor_can_be_left_out() -> None:
    scores = caption_scores({1: "a red circle"}, {1: ["a red circle"]}, meteor=False)
    assert "METEOR" not in scores and "SPICE" not in scores


def test_ptb_tokenisation_ignores_case_and_punctuation() -> None:
    plain = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    shouted = caption_scores({k: v[0].upper() + "." for k, v in REFS.items()}, REFS)
    assert shouted == pytest.approx(plain)


def test_ids_must_match() -> None:
    with pytest.raises(ValueError, match="same"):
        caption_scores({1: "a"}, {2: ["a"]})


def test_validation_scores_without_java_what_pycocoevalcap_scores_with_it() -> None:
    from captioner.data.shapes import ShapesWorld

    world = ShapesWorld(image_size=32)
    scenes = [world.scene("test", i) for i in range(300)]
    references = {i: list(scene.captions) for i, scene in enumerate(scenes)}
    # predictions as a model makes them: right, another scene's, cut short, run on
    predictions = {
        i: [refs[0], references[(i + 1) % 300][0], " ".join(refs[-1].split()[:3]),
            refs[-1] + " , left of a red circle ."][i % 4]
        for i, refs in references.items()
    }  # fmt: skip
    java = caption_scores(predictions, references, meteor=False)
    fast = caption_scores(predictions, references, meteor=False, fast=True)
    assert fast.keys() == java.keys()
    for name, value in java.items():
        assert fast[name] == pytest.approx(value, abs=1e-6), name
