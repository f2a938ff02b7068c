"""Caption metrics computed with pycocoevalcap, the scorer that papers report.

pycocoevalcap tokenises with Stanford's PTBTokenizer and runs METEOR, both on Java. Validation
during training needs neither: it tokenises with `captioner.metrics.ptb` (the same tokens on
captions) and scores CIDEr-D in-process (`captioner.metrics.cider`, equal to pycocoevalcap's).
The test metrics use Java where it is installed; without it BLEU, ROUGE-L and CIDEr come from
the Python tokenizer, METEOR and SPICE are left out, and one line says so and how to get them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
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

from captioner.core.tokenizer import one_line
from captioner.metrics import ptb
from captioner.metrics.cider import cider_d

log = logging.getLogger(__name__)


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


NO_JAVA = (
    "Java is not installed: METEOR and SPICE are left out, and BLEU, ROUGE-L and CIDEr are "
    "computed with captioner's Python PTB tokenizer (the same tokens on captions). For METEOR, "
    "install a Java runtime (Debian/Ubuntu: sudo apt-get install default-jre-headless; macOS: "
    "brew install openjdk; conda: conda install openjdk)"
)


def has_java() -> bool:
    return shutil.which("java") is not None


def tokenizer_name(fast: bool) -> str:
    """Which tokenizer `caption_scores` uses, for the evaluation card."""
    if fast or not has_java():
        return "captioner.metrics.ptb (Python PTB tokenizer)"
    return "pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, Java)"


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
    fast: bool = False,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) over a corpus, after the PTB tokenisation the
    COCO caption server uses; SPICE when asked.

    `predictions` maps image id -> one caption; `references` maps image id -> its references.
    `fast` (validation): no Java at all, the Python tokenizer and the in-process CIDEr-D, and
    no METEOR, whose Java process takes seconds to start. Without Java, METEOR and SPICE are
    left out (`NO_JAVA` says so, once).
    """
    if set(predictions) != set(references) or not predictions:
        raise ValueError("predictions and references must cover the same, non-empty image ids")
    java = has_java() and not fast
    if not fast:
        warn_if_no_java()
    refs = {k: [one_line(c) for c in group] for k, group in references.items()}
    preds = {k: [one_line(c)] for k, c in predictions.items()}
    with _quiet():
        tokenize = PTBTokenizer().tokenize if java else ptb.tokenize
        gts = tokenize({k: [{"caption": c} for c in group] for k, group in refs.items()})
        res = tokenize({k: [{"caption": c} for c in group] for k, group in preds.items()})
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
        if meteor and java:
            scores["METEOR"] = float(_meteor().compute_score(gts, res)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if java:
            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        else:
            scores["CIDEr"] = cider_d({k: v[0] for k, v in res.items()}, gts)[0]
        if spice and java:
            scores["SPICE"] = _spice(gts, res)
    return scores


@functools.cache
def warn_if_no_java() -> None:
    """`NO_JAVA`, once per process: at start-up, so a run says what it will leave out."""
    if not has_java():
        log.warning(NO_JAVA)
