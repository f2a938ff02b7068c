"""Caption metrics computed with pycocoevalcap, the scorer that papers report."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.data.tokenizer import one_line
from captioner.errors import ConfigError


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


def check_java(why: str) -> None:
    """pycocoevalcap's tokenizer and METEOR run on Java: say so before any work, not after
    decoding a whole split."""
    if shutil.which("java") is None:
        raise ConfigError(
            f"Java is not installed, and {why} (pycocoevalcap's tokenizer and METEOR run on "
            "it): install a Java runtime (Debian/Ubuntu: sudo apt-get install "
            "default-jre-headless; macOS: brew install openjdk; conda: conda install openjdk)"
        )


@functools.lru_cache(maxsize=1)
def _meteor_process() -> Meteor:
    """One METEOR Java process per Python process: its start-up costs seconds."""
    return Meteor()


def _meteor() -> Meteor:
    scorer = _meteor_process()
    if scorer.meteor_p.poll() is not None:  # the Java process died: start another
        _meteor_process.cache_clear()
        scorer = _meteor_process()
    return scorer


def _spice(gts: dict, res: dict) -> float:
    # Imported here: SPICE is optional and fetches Stanford CoreNLP models on first use.
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
    except Exception as err:  # a failed download or Java error, reported with the fix
        raise RuntimeError(
            "SPICE failed; it needs Java 8+ and downloads Stanford CoreNLP models (~1 GB) on "
            f"first use, so run it once with internet access or leave it off ({err})"
        ) from err
    return float(score)


def caption_scores(
    predictions: Mapping[int | str, str],
    references: Mapping[int | str, Sequence[str]],
    *,
    meteor: bool = True,
    spice: bool = False,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) over a corpus, after the PTB tokenisation the
    COCO caption server uses; SPICE when asked.

    `predictions` maps image id -> one caption; `references` maps image id -> its references.
    METEOR starts a Java process (seconds), so validation during training leaves it out.
    """
    if set(predictions) != set(references) or not predictions:
        raise ValueError("predictions and references must cover the same, non-empty image ids")
    with _quiet():
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize(
            {k: [{"caption": one_line(c)} for c in refs] for k, refs in references.items()}
        )
        res = tokenizer.tokenize({k: [{"caption": one_line(c)}] for k, c in predictions.items()})
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
        if meteor:
            scores["METEOR"] = float(_meteor().compute_score(gts, res)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if spice:
            scores["SPICE"] = _spice(gts, res)
    return scores
