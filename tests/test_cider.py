"""The Java-free PTB tokenizer and CIDEr-D, checked against pycocoevalcap itself."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.data.shapes import ShapesWorld
from captioner.metrics import ptb
from captioner.metrics.cider import CiderD, DocumentFrequency, cider_d

_SUBJECTS = [
    "a man", "A woman", "two dogs", "The cat", "a group of people", "A young boy", "an elephant",
    "three giraffes", "A baseball player", "a little girl", "the kids", "Someone", "a chef",
    "An old man's dog", "a surfer", "The bus driver", "a plate of food", "A black-and-white cow",
]  # fmt: skip
_VERBS = [
    "riding", "sitting on", "standing next to", "holding", "eating", "looking at", "playing with",
    "walking down", "is flying", "carrying", "leaning against", "cutting", "parked near",
]  # fmt: skip
_OBJECTS = [
    "a wave", "a red and white surfboard", "the bench", "a hot-dog", "a slice of pizza",
    "an old, rusty bike", "a frisbee", "the kite", "a large pizza", "some broccoli",
    "a toothbrush", "the traffic light", "a laptop computer", "a 3-year-old's toy",
]  # fmt: skip
_PLACES = [
    "on a beach", "in the park", "near the water's edge", "at night", "in a kitchen",
    "on top of a table", "down the street", "", "", "in front of a building",
]  # fmt: skip

# Captions a tokenizer could trip on, each kind the COCO data has: punctuation, quotes,
# contractions, possessives, hyphens, numbers, brackets, slashes, ampersands, non-ASCII text,
# blanks, abbreviations, capitals.
_HARD_CAPTIONS = [
    "A man, a plan; a canal: Panama!", "Is this a dog?", "Wow!!! What a view?!", "a cat... asleep",
    "a cat . . . asleep", "dog - cat", "dog -- cat", "dog --- cat", "dog—cat", "dog – cat",
    'A sign that says "STOP".', "A sign reading 'no parking' here", "“Fancy” quotes", '"Quoted"',
    "‘single’ quotes", "The word ''hi''", "`back` ticks", "«guillemets»", "It's a dog", "don't",
    "I can't, won't and shouldn't", "I'm sure they're here and we've seen he'll go; she'd know",
    "it isn't", "DOESN'T", "y'all", "five o'clock", "yes ma'am", "rock 'n' roll", "the '90s",
    "gonna go", "we cannot", "wanna play", "'Tis the season", "the dog's bone", "the dogs' bones",
    "James' car", "children's toys", "a women's restroom", "McDonald's sign", "the boss’s desk",
    "a black-and-white photo", "a 3-year-old child", "a t-shirt", "an x-ray", "well-known",
    "anti-theft device", "co-op", "1,000 people", "3.5 inches", "$5.99 each", "at 10:30 am",
    "1/2 a sandwich", "1 1/2 cups", "the #1 fan", "50% off", "2nd place", "1990s cars",
    "on 12-1-2013", "call 555-1234", "(555) 123-4567", "a dog (brown) sits", "[sic] text",
    "{braces}", "(left) and (right)", "black/white", "and/or", "w/ a hat", "open 24/7",
    "a tv/dvd combo", "AT&T store", "R&B", "salt & pepper", "Q&A", "fish &amp; chips", "café",
    "a crème brûlée", "naïve", "jalapeño", "Zürich", "em—dash", "an ellipsis…", "75°F",
    "2×4 board", "½ cup", "€5", "£10", "Straße", "Москва", "東京 tower", "a dog 🐶 runs",
    "  a  dog  ", "a\tdog", "\ta dog\t", "a dog .", "A dog.", "A DOG RUNNING ON THE BEACH.",
    "THE U.S. FLAG", "I CAN'T", "Mr. Smith", "a U.S. flag", "St. Louis", "Dr. Who", "toys etc.",
    "e.g. a cat", "i.e. that one", "cats vs. dogs", "the letter A.", "Plan B.", "I.", "No. 5",
    "fig. 3", "Jan. 5", "Co. Ltd", "www.example.com", "visit google.com", "me@example.com",
    "#hashtag", "@user", "smile :)", "a:b", "x=y", "a+b", "a*b", "~ish", "1.5m tall", "the 1st.",
    "a 2.", "...", "", "   ", ".", "A", "a sign: 'Beware of dog'", "ok.", "Jr.", "5'6\" tall",
    "c++ code", "C# code", "<b>bold</b>", "a < b > c", "^_^", "ready?no", "dog.cat", "x_y",
]  # fmt: skip

# Where Java and Python cannot agree, left out of the comparison on purpose:
# - a capital sigma after a digit, as in "2x4Σ": Java's toLowerCase chooses the final form ς by
#   word boundaries, Python by the Unicode Final_Sigma rule (after a letter only), so σ. Greek
#   words themselves ("ΟΔΟΣ") agree.
_KNOWN_DIFFERENCES = ["2x4Σ"]


def _coco_like(rng: random.Random) -> str:
    """A COCO-style sentence with the casing, spacing and full stops annotators leave."""
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
    text = " ".join(w for w in words if w)
    if rng.random() < 0.5:
        text += rng.choice([".", " .", "!", "..."])
    if rng.random() < 0.1:
        text = text.upper()
    if rng.random() < 0.1:
        text = rng.choice(["  ", "\t", " "]) + text.replace(" ", rng.choice(["  ", " \t"]), 1)
    return text


def _caption_sets(count: int, seed: int = 0) -> dict[int, list[str]]:
    """Five captions an image: COCO-like sentences, with the hard captions mixed in."""
    rng = random.Random(seed)
    hard = iter(_HARD_CAPTIONS)
    sets = {image: [_coco_like(rng) for _ in range(5)] for image in range(count)}
    for group, caption in zip(sets.values(), hard, strict=False):
        group[2] = caption
    return sets


def _java_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        return PTBTokenizer().tokenize(
            {k: [{"caption": c} for c in group] for k, group in captions.items()}
        )


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer runs on Java")
def test_ptb_tokenize_matches_java_ptbtokenizer() -> None:
    captions = _caption_sets(len(_HARD_CAPTIONS) + 60)
    assert not set(_KNOWN_DIFFERENCES) & {c for group in captions.values() for c in group}
    expected = _java_tokenize(captions)
    got = ptb.tokenize(captions)
    assert set(got) == set(expected)
    mismatches = [
        (caption, want, have)
        for k in captions
        for caption, want, have in zip(captions[k], expected[k], got[k], strict=True)
        if want != have
    ]
    assert not mismatches


def test_ptb_tokenize_known_cases() -> None:
    """Java's answers (PTBTokenizer -preserveLines -lowerCase), kept for machines without it."""
    cases = {
        "I don't know, it's 3.5 or 1,000 etc.": "i do n't know it 's 3.5 or 1,000 etc.",
        "A man (in red) holds a sign.": "a man -lrb- in red -rrb- holds a sign",
        'The dogs\' toys, colour & "fun"': "the dogs toys colour & fun",
        "He cannot gonna U.S.": "he can not gon na u.s.",
        "A black-and-white photo—of a café": "a black-and-white photo of a café",
    }
    assert {c: ptb.tokenize_caption(c) for c in cases} == cases
    # A rule looks past the line's end: "T." before "A ..." is the letter and a full stop.
    assert ptb.tokenize({1: ["the letter T."], 2: ["A cat"]}) == {1: ["the letter t"], 2: ["a cat"]}
    assert ptb.tokenize_caption("the letter T.") == "the letter t."


def test_ptb_tokenize_takes_strings_or_records() -> None:
    captions = _caption_sets(20)
    records = {k: [{"caption": c} for c in group] for k, group in captions.items()}
    assert ptb.tokenize(records) == ptb.tokenize(captions)
    assert ptb.tokenize({"a": ["one\ntwo"], "b": []}) == {"a": ["one two"], "b": []}


def test_ptb_shortcut_gives_what_the_rule_table_gives() -> None:
    captions = [c for group in _caption_sets(200).values() for c in group]
    text = "\n".join(captions)
    assert list(ptb._lex(text)) == list(ptb._lex(text, shortcut=False))


def _cider_fixture() -> tuple[dict[int, str], dict[int, list[str]]]:
    """300 shapes scenes and 200 COCO-like images, five tokenised references each, with
    predictions from exact copies to nothing."""
    world = ShapesWorld(grid=3, min_objects=2, max_objects=3)
    scenes = (world.scene("val", i).captions for i in itertools.count())
    references = dict(enumerate(itertools.islice((list(c) for c in scenes if len(c) == 5), 300)))
    coco = ptb.tokenize({300 + k: v for k, v in _caption_sets(200, seed=1).items()})
    references.update(coco)
    rng = random.Random(2)
    keys = list(references)
    predictions = {}
    for k, refs in references.items():
        words = rng.choice(refs).split()
        kind = k % 8
        if kind == 0:
            predictions[k] = " ".join(words)  # an exact reference
        elif kind == 1:
            predictions[k] = " ".join(words[: max(1, len(words) // 2)])  # a truncated one
        elif kind == 2:
            predictions[k] = " ".join(rng.sample(words, len(words)))  # shuffled
        elif kind == 3:
            predictions[k] = rng.choice(references[rng.choice(keys)])  # another image's
        elif kind == 4:
            predictions[k] = ""  # nothing
        elif kind == 5:
            predictions[k] = rng.choice(["a", "dog", "circle", "zebra"])  # one word
        elif kind == 6:
            predictions[k] = " ".join(words + words)  # repeated
        else:
            predictions[k] = "an unrelated caption about quantum chromodynamics"
    return predictions, references


def _pycocoevalcap_cider(
    predictions: dict[int, str], references: dict[int, list[str]]
) -> tuple[float, np.ndarray]:
    with contextlib.redirect_stdout(io.StringIO()):
        score, scores = Cider().compute_score(references, {k: [c] for k, c in predictions.items()})
    return float(score), np.asarray(scores)


def test_cider_d_matches_pycocoevalcap() -> None:
    predictions, references = _cider_fixture()
    want, want_each = _pycocoevalcap_cider(predictions, references)
    got, got_each = cider_d(predictions, references)
    assert got == pytest.approx(want, abs=1e-6)
    np.testing.assert_allclose(got_each, want_each, rtol=0, atol=1e-6)
    assert got_each.max() > 5 and got_each.min() == 0  # the fixture spans the whole range


def test_document_frequency_of_the_evaluated_set_gives_the_same_scores(tmp_path: Path) -> None:
    predictions, references = _cider_fixture()
    df = DocumentFrequency.from_references(references.values())
    assert df.num_images == len(references) and df.ref_len == pytest.approx(np.log(500))
    df.save(tmp_path / "df.json")
    for copy in (
        df,
        DocumentFrequency.from_dict(df.to_dict()),
        DocumentFrequency.load(tmp_path / "df.json"),
        pickle.loads(pickle.dumps(df)),
    ):
        assert copy == df
        np.testing.assert_array_equal(
            cider_d(predictions, references, copy)[1], cider_d(predictions, references)[1]
        )


def test_scorer_scores_many_samples_as_it_scores_each() -> None:
    """Self-critical training scores k samples an image against that image's references."""
    predictions, references = _cider_fixture()
    scorer = CiderD(DocumentFrequency.from_references(references.values()))
    refs = references[300]
    samples = [predictions[k] for k in range(300, 316)] + [refs[0], ""]
    together = scorer.score(samples, refs)
    assert together.shape == (len(samples),) and together.dtype == np.float64
    alone = [scorer.score([s], refs)[0] for s in samples]
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(scorer.score(samples, scorer.prepare(refs)), together)
    assert together[-2] == together.max() and together[-1] == 0.0


def test_scores_need_matching_ids_and_references() -> None:
    with pytest.raises(ValueError, match="same"):
        cider_d({1: "a dog"}, {2: ["a dog"]})
    scorer = CiderD(DocumentFrequency({"a": 1}, 1))
    with pytest.raises(ValueError, match="reference"):
        scorer.score(["a dog"], [])
    with pytest.raises(TypeError, match="list of captions"):
        scorer.score("a dog", ["a dog"])
    with pytest.raises(TypeError, match="list of captions"):
        scorer.score(["a dog"], "a dog")
