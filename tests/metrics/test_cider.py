"""The in-process CIDEr-D and its document frequencies, checked against pycocoevalcap itself."""

from __future__ import annotations

import contextlib
import io
import itertools
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.data.cache import cached_json
from captioner.data.shapes import ShapesWorld
from captioner.metrics import ptb
from captioner.metrics.cider import CiderD, DocumentFrequency, cider_d
from tests.helpers import caption_sets


def _cider_fixture() -> tuple[dict[int, str], dict[int, list[str]]]:
    """300 shapes scenes and 200 COCO-like images, five tokenised references each, with
    predictions from exact copies to nothing."""
    world = ShapesWorld(grid=3, min_objects=2, max_objects=3)
    scenes = (world.scene("val", i).captions for i in itertools.count())
    references = dict(enumerate(itertools.islice((list(c) for c in scenes if len(c) == 5), 300)))
    coco = ptb.tokenize({300 + k: v for k, v in caption_sets(200, seed=1).items()})
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

    def cached(build: object) -> DocumentFrequency:  # the cache training keeps beside the data
        return cached_json(
            build, tmp_path / "df.json", DocumentFrequency.to_dict, DocumentFrequency.from_dict, str
        )

    assert cached(lambda: df) == df and (tmp_path / "df.json").is_file()
    for copy in (
        df,
        DocumentFrequency.from_dict(df.to_dict()),
        cached(lambda: pytest.fail("the cache is read, not rebuilt")),
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
