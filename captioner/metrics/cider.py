"""CIDEr-D in-process, equal to pycocoevalcap's `Cider`, with the document frequencies held apart
so self-critical training can score sampled captions against the training split's statistics.

CIDEr-D (Vedantam et al., 2015) as the COCO evaluation code computes it: n-grams of 1 to 4 words
weighted by tf-idf, where an n-gram's document frequency is the number of images whose
references contain it and the idf is log(images) - log(max(1, df)); per order, the candidate's
clipped vector, min(candidate, reference), is dotted with each reference's and divided by both
norms, times a Gaussian penalty exp(-delta^2 / (2 * 6^2)) on the length difference; the orders
are averaged, the references averaged, and the result multiplied by 10. Like pycocoevalcap, the
length is the number of bigrams (one less than the words, never below zero).

Captions are compared as given: tokenise them first (`captioner.metrics.ptb.tokenize`), the same
way on both sides. A caption is a string, split on whitespace, or a sequence of tokens that hold
no whitespace.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MAX_N = 4  # n-grams of 1..MAX_N words
SIGMA = 6.0  # width of the length penalty, in words

Caption = str | Sequence[str]


def _ngrams(caption: Caption) -> list[Counter[str]]:
    """Counts of the caption's n-grams, one Counter per order, each n-gram as its words joined
    by single spaces (cheaper to hash and store than tuples)."""
    words = caption.split() if isinstance(caption, str) else list(caption)
    shifted = [words[n:] for n in range(MAX_N)]  # zip(*shifted[:n]) walks the n-word windows
    return [Counter(map(" ".join, zip(*shifted[:n], strict=False))) for n in range(1, MAX_N + 1)]


@dataclass(frozen=True)
class DocumentFrequency:
    """How many images' references contain each n-gram, and how many images there were: the idf
    statistics, built once from a corpus (the evaluated set, or the training split for
    self-critical rewards) and saved as JSON so a run need not rebuild them."""

    counts: Mapping[str, int]  # n-gram (words joined by " ") -> images whose references hold it
    num_images: int

    @classmethod
    def from_references(cls, references: Iterable[Sequence[Caption]]) -> DocumentFrequency:
        """`references` holds each image's references; an n-gram counts once per image."""
        counts: Counter[str] = Counter()
        num_images = 0
        for image_references in references:
            seen: set[str] = set()
            for caption in image_references:
                for order in _ngrams(caption):
                    seen.update(order)
            counts.update(seen)
            num_images += 1
        if num_images == 0:
            raise ValueError("document frequencies need the references of at least one image")
        return cls(dict(counts), num_images)

    @property
    def ref_len(self) -> float:
        """log(number of images): the idf of an n-gram seen in at most one image."""
        return math.log(self.num_images)

    def to_dict(self) -> dict[str, object]:
        return {"num_images": self.num_images, "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DocumentFrequency:
        counts = data["counts"]
        num_images = data["num_images"]
        if not isinstance(counts, Mapping) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError("document frequencies need 'counts' (a mapping) and 'num_images' >= 1")
        return cls({str(k): int(v) for k, v in counts.items()}, num_images)


@dataclass(frozen=True)
class _Vector:
    """A caption's tf-idf weights and their norm, per n-gram order, and its length in bigrams."""

    weights: tuple[dict[str, float], ...]
    norms: tuple[float, ...]
    length: int


@dataclass(frozen=True)
class PreparedReferences:
    """An image's references as tf-idf vectors, from `CiderD.prepare`, so that references scored
    again and again are not rebuilt each time; valid for the scorer (frequencies) that built
    them."""

    vectors: tuple[_Vector, ...]


class CiderD:
    """Scores captions against references with fixed document frequencies.

    For self-critical training: `score(samples, references)` scores an image's sampled captions
    against its references, building each reference's vector once for all samples; `prepare`
    builds them ahead for references scored again and again.
    """

    def __init__(self, document_frequency: DocumentFrequency, sigma: float = SIGMA) -> None:
        self.document_frequency = document_frequency
        self.sigma = sigma
        self._ref_len = document_frequency.ref_len
        self._idf: dict[str, float] = {}  # filled as n-grams of the corpus turn up

    def _idf_of(self, gram: str) -> float:
        """log(images) - log(max(1, df)); remembered only for n-grams the corpus has, so the
        cache never outgrows the document frequencies however many samples are scored."""
        df = self.document_frequency.counts.get(gram)
        if df is None:
            return self._ref_len
        idf = self._idf[gram] = self._ref_len - math.log(max(1.0, df))
        return idf

    def _vector(self, caption: Caption) -> _Vector:
        counts = _ngrams(caption)
        idf = self._idf
        weights = tuple(
            {g: tf * (idf[g] if g in idf else self._idf_of(g)) for g, tf in order.items()}
            for order in counts
        )
        norms = tuple(math.sqrt(sum(w * w for w in order.values())) for order in weights)
        return _Vector(weights, norms, sum(counts[1].values()))

    def prepare(self, references: Sequence[Caption]) -> PreparedReferences:
        """An image's references as vectors, to pass to `score` in place of the captions."""
        if isinstance(references, str):
            raise TypeError("references are a list of captions, not one caption")
        if not references:
            raise ValueError("an image needs at least one reference caption")
        return PreparedReferences(tuple(self._vector(r) for r in references))

    def _similarity(self, candidate: _Vector, reference: _Vector) -> float:
        """Sum over orders of the clipped cosine similarity, times the length penalty."""
        total = 0.0
        for hyp, ref, hyp_norm, ref_norm in zip(
            candidate.weights, reference.weights, candidate.norms, reference.norms, strict=True
        ):
            if hyp_norm == 0.0 or ref_norm == 0.0:
                continue  # no n-gram of this order, or only ones weighted zero: adds nothing
            dot = sum(min(hyp[g], ref[g]) * ref[g] for g in hyp.keys() & ref.keys())
            total += dot / (hyp_norm * ref_norm)
        delta = candidate.length - reference.length
        return total * math.exp(-(delta * delta) / (2 * self.sigma**2))

    def score(
        self, candidates: Sequence[Caption], references: Sequence[Caption] | PreparedReferences
    ) -> np.ndarray:
        """CIDEr-D of each candidate against the same references (one image's), as float64."""
        if isinstance(candidates, str):
            raise TypeError("candidates are a list of captions, not one caption")
        if not isinstance(references, PreparedReferences):
            references = self.prepare(references)
        refs = references.vectors
        scale = 10.0 / (MAX_N * len(refs))
        out = np.empty(len(candidates), dtype=np.float64)
        for i, caption in enumerate(candidates):
            vector = self._vector(caption)
            out[i] = scale * sum(self._similarity(vector, r) for r in refs)
        return out


def cider_d(
    predictions: Mapping[object, Caption],
    references: Mapping[object, Sequence[Caption]],
    document_frequency: DocumentFrequency | None = None,
) -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D and each image's score, in the order of `predictions`.

    Without `document_frequency` the statistics come from these references, as pycocoevalcap's
    `Cider().compute_score(references, predictions)` does, and the scores equal its scores.
    """
    if set(predictions) != set(references) or not predictions:
        raise ValueError("predictions and references must cover the same, non-empty image ids")
    if document_frequency is None:
        document_frequency = DocumentFrequency.from_references(references.values())
    scorer = CiderD(document_frequency)
    scores = np.array([scorer.score([c], references[k])[0] for k, c in predictions.items()])
    return float(scores.mean()), scores
