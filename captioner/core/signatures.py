"""Whether a plain value fits a parameter's declared type, so a wrong value is named before the
code that takes it runs (a command line's `trainer.max_steps=abc`, a checkpoint's recorded
data config), with what would fit.

Values arrive as JSON or YAML gives them: booleans, integers, floats, strings, nulls and lists.
A hint is judged by its plain parts: `bool`, `int`, `float` (an integer fits too), `str`,
`None`, `Literal[...]` and `Sequence[...]` of them. `strict` (a value read from a file) refuses
a hint with any other part; otherwise such a hint (a class, a callable) is left to the code
that takes the value.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from captioner.core.values import is_finite, is_int, short

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def keyword_parameters(target: Callable[..., Any]) -> tuple[dict[str, Any], set[str]]:
    """Every keyword argument `target(...)` takes, with its declared type (`Any` where none is
    declared), and those without a default. For a class, its `__init__`'s, and through
    `**kwargs` its base classes' too."""
    fields: dict[str, Any] = {}
    required: set[str] = set()
    functions = (
        [vars(klass)["__init__"] for klass in target.__mro__ if "__init__" in vars(klass)]
        if inspect.isclass(target)
        else [target]
    )
    for function in functions:
        hints = typing.get_type_hints(function)
        parameters = list(inspect.signature(function).parameters.values())
        if inspect.isclass(target):
            parameters = parameters[1:]  # self
        for p in parameters:
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                fields.setdefault(p.name, hints.get(p.name, Any))
                if p.default is p.empty:
                    required.add(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break  # the rest of the chain is not reachable by keyword
    return fields, required


def mismatch(hint: Any, value: Any, strict: bool = False) -> str | None:
    """None if `value` fits `hint`, else what would fit ("an integer or null")."""
    if not strict and not _plain(hint):
        return None
    return None if _fits(hint, value) else describe(hint)


def describe(hint: Any) -> str:
    """What fits a hint, as a message says it."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        named = [describe(o) for o in options if o is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in options else "")
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(short(v) for v in typing.get_args(hint)[:12])
    if typing.get_origin(hint) is Sequence:
        return f"a list of ({describe(typing.get_args(hint)[0])})"
    if hint is type(None):
        return "null"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _plain(hint: Any) -> bool:
    """Whether every part of `hint` has a plain form."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return all(map(_plain, typing.get_args(hint)))
    if origin is Sequence:
        return _plain(typing.get_args(hint)[0])
    return origin is typing.Literal or hint in _NAMES or hint is type(None)


def _fits(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(option, value) for option in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if origin is Sequence:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(item, v) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value) and abs(value) < 2**63  # what torch and numpy take
    if hint is float:
        return is_finite(value)
    if hint is str:
        return isinstance(value, str)
    return False  # a type with no plain form never fits a value read from a file
