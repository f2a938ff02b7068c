"""Plain values read from files (checkpoints, exports, recorded configs): what counts as an
integer or a finite number, and how a value is shown in an error message.

A file can hold anything JSON or a pickle of plain values can: `True` where an integer belongs,
an integer of a thousand digits, a list nested thousands deep. These helpers never raise on
such values, so a check can always finish and name the field.
"""

from __future__ import annotations

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
