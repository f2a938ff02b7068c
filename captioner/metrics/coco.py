"""Caption metrics computed with pycocoevalcap, the scorer that papers report."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide pycocoevalcap's prints and the Java tokenizer's stderr, which bypasses Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()):
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def caption_scores(
    predictions: Mapping[int | str, str], references: Mapping[int | str, Sequence[str]]
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr(-D) over a corpus, after the PTB tokenisation the COCO server uses.

    `predictions` maps image id -> one caption; `references` maps image id -> its references.
    """
    if set(predictions) != set(references) or not predictions:
        raise ValueError("predictions and references must cover the same, non-empty image ids")
    with _quiet():
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize(
            {k: [{"caption": c} for c in refs] for k, refs in references.items()}
        )
        res = tokenizer.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["CIDEr"] = float(cider)
    return scores
