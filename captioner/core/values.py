"""Plain values read from files (checkpoints, exports, recorded configs, annotations): what
counts as an integer or a finite number (the one number check), how a value is shown in an
error message, and JSON whose objects name each key once.

A file can hold anything JSON or a pickle of plain values can: `True` where an integer belongs,
an integer of a thousand digits, a list nested thousands deep. These helpers never raise on
such values, so a check can always finish and name the field.
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 4, 4, 40, 40
_SHORT.maxlong = 40


def short(value: Any) -> str:
    """A repr of at most about 80 characters, however large or deep `value` is."""
    return _SHORT.repr(value)[:80]


def key_name(key: Any) -> str:
    """A mapping's key as a message shows it: as written if it is a plain name, else as a
    short repr (no line break or escape code from a file reaches the terminal)."""
    return key if isinstance(key, str) and key.isidentifier() else short(key)


def is_int(value: Any) -> bool:
    """An integer, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A number (not a bool) that is neither NaN nor infinite nor too large for a float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the float range
        return False


class DuplicateKey(ValueError):
    """A JSON object naming the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):  # find the first key named again
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


def loads_unique(text: str | bytes) -> Any:
    """`json.loads`, but an object that names a key twice is a `DuplicateKey` error instead of
    keeping the last value silently."""
    return json.loads(text, object_pairs_hook=_unique_pairs)
