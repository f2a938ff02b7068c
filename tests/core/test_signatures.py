"""The one signature checker, which both a command line's values and a checkpoint's recorded
data config go through: what fits each plain hint, what is named when a value does not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytest

from captioner.core.signatures import describe, keyword_parameters, mismatch


class Base:
    def __init__(self, size: int, name: str = "a") -> None:
        self.size, self.name = size, name


class Child(Base):
    def __init__(self, ratio: float | None = None, **common: Any) -> None:
        super().__init__(**common)


class Closed(Base):
    def __init__(self, flag: bool = False) -> None:
        super().__init__(1)


def function(steps: int, mode: Literal["a", "b"] = "a", *args: int, tag: str = "") -> None:
    """A function's keyword arguments: positional-or-keyword and keyword-only ones."""


def test_keyword_parameters_reach_base_classes_through_kwargs_only() -> None:
    fields, required = keyword_parameters(Child)
    assert fields == {"ratio": float | None, "size": int, "name": str} and required == {"size"}
    fields, _ = keyword_parameters(Closed)  # no **kwargs: the base's are not reachable
    assert fields == {"flag": bool}
    fields, required = keyword_parameters(function)
    assert set(fields) == {"steps", "mode", "tag"} and required == {"steps"}


@pytest.mark.parametrize(
    ("hint", "fits", "misfits"),
    [
        (int, [0, -3, 2**62], [True, 1.0, "1", None, 2**63]),
        (float, [1, 0.5, -2.0], [float("nan"), float("inf"), True, "1.0", 10**400]),
        (bool, [True, False], [0, 1, "true"]),
        (str, ["", "x"], [1, None, ["x"]]),
        (int | None, [None, 3], [1.5, "3"]),
        (Literal["a", "b"], ["a", "b"], ["c", 1]),
        (Literal[1, 2], [1, 2], [True, 1.0]),
        (Sequence[int], [[], [1, 2]], [(1, 2), [1, "2"], 3]),
        (int | Sequence[int], [3, [3, 4]], ["3", [3.5]]),
        (Sequence[Sequence[str]], [[["red", "circle"]]], [["red"], [[1]]]),
    ],
)
def test_plain_hints_take_exactly_their_values(hint: Any, fits: list, misfits: list) -> None:
    for strict in (False, True):
        for value in fits:
            assert mismatch(hint, value, strict) is None, (hint, value)
        for value in misfits:
            assert mismatch(hint, value, strict) == describe(hint), (hint, value)


def test_a_hint_without_a_plain_form_is_left_to_the_code_or_refused_from_a_file() -> None:
    for hint in (Callable[..., Any], object, dict[str, int], int | Callable[..., Any]):
        assert mismatch(hint, {"_target_": "os.system"}) is None  # the command line: the class's
        assert mismatch(hint, {"_target_": "os.system"}, strict=True) is not None  # a file: never


def test_what_fits_is_said_as_a_message_says_it() -> None:
    assert describe(int | None) == "an integer or null"
    assert describe(bool) == "true or false"
    assert describe(Literal["stop", "skip"]) == "'stop' or 'skip'"
    assert describe(Sequence[int] | int) == "a list of (an integer) or an integer"
