"""Word-level tokenizer whose vocabulary comes from the training captions only."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from captioner.core.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# never words: NUL, escape codes, line breaks..., and lone UTF-16 surrogates (JSON can hold
# "\ud800", which no UTF-8 encoder, the COCO scorer's included, accepts)
_CONTROLS = r"\x00-\x1f\x7f-\x9f\ud800-\udfff"
_CONTROL = re.compile(f"[{_CONTROLS}]")
# the line and paragraph separators and bidirectional overrides, which can split or reorder
# a terminal's line
_LAYOUT = "\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\\s{_CONTROLS}{_LAYOUT}]")  # what a word read from a file may not hold
_ESCAPED = re.compile(f"[\\\\{_CONTROLS}{_LAYOUT}]")  # what `escape` writes as escapes
_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
# never a word either: the layout characters, which would reorder a printed caption
_WORD = re.compile(f"[a-z0-9]+(?:'[a-z]+)?|[^\\sa-z0-9{_CONTROLS}{_LAYOUT}]")
# Dense-caption sets run to a few thousand characters; more is a file's worth of text in one
# field, which no caption model should train on or be scored against.
MAX_CAPTION_CHARS = 10_000


def tokenizer_settings(min_freq: int) -> dict[str, Any]:
    """Everything that decides the vocabulary besides the captions: part of its cache key."""
    return {"type": "word", "pattern": _WORD.pattern, "specials": SPECIALS, "min_freq": min_freq}


def one_line(text: str) -> str:
    """`text` as one line: control characters and line breaks of every kind become spaces,
    runs of whitespace one space. The COCO scorer's tokenizer reads a caption a line, so a
    stray carriage return in one reference would move every later one onto the wrong image."""
    return " ".join(_CONTROL.sub(" ", text).split())


def caption_problem(caption: str) -> str | None:
    """Why a caption (already `one_line`) cannot be used, or None."""
    if not caption:
        return "empty caption"
    if len(caption) > MAX_CAPTION_CHARS:
        return f"caption of {len(caption)} characters, over the limit of {MAX_CAPTION_CHARS}"
    return None


def escape(text: str) -> str:
    """`text` as one printable line: backslashes, control characters, line separators and
    bidirectional overrides become backslash escapes (`\\n`, `\\x1b`, `\\u202e`), and a byte
    that was not UTF-8 (kept by Python as a lone surrogate) becomes `\\xNN`."""
    return _ESCAPED.sub(_escape_char, text)


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # `surrogateescape`'s stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe_word(word: str) -> str:
    """`word` as it can be printed: unchanged if it is an ordinary word, else escaped."""
    if not word:
        return "<empty>"
    return escape(word) if _UNSAFE.search(word) else word


def split_words(text: str) -> list[str]:
    """Lower-case and split into words, with each punctuation mark its own word."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Maps captions to ids and back; `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3."""

    def __init__(self, words: Iterable[str]) -> None:
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("the vocabulary has duplicate words")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1) -> Tokenizer:
        """Vocabulary of words seen at least `min_freq` times, most frequent first."""
        if min_freq < 1:
            raise ConfigError(f"data.min_freq must be >= 1, got {min_freq}.")
        counts = Counter(w for c in captions for w in split_words(c))
        kept = (w for w, n in counts.items() if n >= min_freq)
        words = sorted(kept, key=lambda w: (-counts[w], w))  # most frequent first
        if not words:
            raise ConfigError(
                f"no word occurs {min_freq} or more times in the training captions: "
                "lower data.min_freq or check the captions."
            )
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """`<bos>` words `<eos>`; if `max_len` is given, the words are cut to fit it."""
        ids = [self.stoi.get(w, self.unk_id) for w in split_words(text)]
        if max_len is not None:
            ids = ids[: max_len - 2]
        return [self.bos_id, *ids, self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first `<eos>`, skipping `<bos>`/`<pad>`; punctuation hugs its word."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        text = " ".join(words)
        return re.sub(r" ([.,;:!?)])", r"\1", text).replace("( ", "(")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able state, stored in every checkpoint."""
        return {"type": "word", "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, state: Any) -> Tokenizer:
        """The tokenizer `to_dict` describes, read from a file: `ValueError` says what is wrong.

        A word no caption could have produced (holding a line break, a tab, an escape code...)
        is kept, escaped (`a\\nb`), so printing a caption can never forge lines or drive a
        terminal.
        """
        if not isinstance(state, dict) or state.get("type", "word") != "word":
            raise ValueError("expected a mapping with type 'word' and a list 'itos'")
        itos = state.get("itos")
        if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
            raise ValueError("'itos' must be a list of words (strings)")
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError("the vocabulary does not start with <pad> <bos> <eos> <unk>")
        return cls(map(safe_word, itos[len(SPECIALS) :]))
