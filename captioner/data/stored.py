"""The data config a checkpoint records, read back as data, never as code.

Training keeps its data config in every checkpoint, so that evaluation finds the test split
without being told. A file can be written by anyone, so what it says is never handed to
`hydra.utils.instantiate`: it must name one of the data kinds below, and every field must be
a keyword argument of that kind's class with a value of the type its signature declares
(numbers, strings, lists of them). Nothing else is accepted: no `_target_` below the top
level, no mappings, no unknown keys. Shards read through a command (`pipe:`) or from a URL
are never recorded by training and never accepted from a file: the user names them on the
command line, where they are the user's own.
"""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin, get_type_hints

from captioner.data.datamodule import CaptionDataModule, ShapesDataModule
from captioner.data.files import (
    CocoDataModule,
    FlickrDataModule,
    KarpathySplitDataModule,
    TableDataModule,
)
from captioner.data.shards import REMOTE_PREFIXES, WebDataModule
from captioner.errors import ConfigError

KINDS: dict[str, type[CaptionDataModule]] = {
    f"captioner.data.{cls.__name__}": cls
    for cls in (
        ShapesDataModule, CocoDataModule, KarpathySplitDataModule, FlickrDataModule,
        TableDataModule, WebDataModule,
    )
}  # fmt: skip
SHARD_KEYS = ("train_shards", "val_shards", "test_shards")
_HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def record_data_config(config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of the run's (resolved) data config: all of it, except shard
    lists read through a command or from a URL, which become null (not recorded)."""
    recorded = dict(config)
    for key in SHARD_KEYS:
        if _remote(recorded.get(key)):
            recorded[key] = None
    return recorded


def check_data_config(config: Any) -> tuple[type[CaptionDataModule], dict[str, Any]]:
    """The class and keyword arguments a recorded data config names, each field checked
    against the class's signature; `ConfigError` names the first field that is wrong."""
    if not isinstance(config, dict):
        raise ConfigError(f"data: expected a mapping of data keys, got {_kind(config)}.")
    target = config.get("_target_")
    if target not in KINDS:
        raise ConfigError(
            f"data._target_: {target!r:.80} is not a data kind; expected one of {sorted(KINDS)}."
        )
    fields, required = _fields(KINDS[target])
    if missing := sorted(required - set(config)):
        raise ConfigError(f"data.{missing[0]}: missing; {target} needs {missing}.")
    kwargs = {}
    for key, value in config.items():
        if key == "_target_":
            continue
        if key in SHARD_KEYS and value is None:  # not recorded (remote), or not given
            kwargs[key] = None
            continue
        if not isinstance(key, str) or key not in fields:
            hint = " (Hydra keys are never read from a file)" if key in _HYDRA_KEYS else ""
            raise ConfigError(
                f"data.{key!s:.80}: not a key of {target}{hint}; expected some of {sorted(fields)}."
            )
        if not _conforms(value, fields[key]):
            raise ConfigError(f"data.{key}: expected {_describe(fields[key])}, got {_kind(value)}.")
        if key in SHARD_KEYS and _remote(value):
            raise ConfigError(
                f"data.{key}: names shards read through a command or from a URL "
                f"({_first_remote(value)!r:.80}), which a checkpoint may not do; name the "
                f"shards on the command line instead (data=webdataset data.{key}=...)."
            )
        kwargs[key] = value
    return KINDS[target], kwargs


def datamodule_from_record(config: Any, **changes: Any) -> CaptionDataModule:
    """The DataModule a recorded data config describes, with `changes` (e.g. the model's
    `image_size` and `max_len`) applied on top."""
    cls, kwargs = check_data_config(config)
    return cls(**{**kwargs, **changes})


def _remote(spec: Any) -> bool:
    return _first_remote(spec) is not None


def _first_remote(spec: Any) -> str | None:
    specs = [spec] if isinstance(spec, str) else spec if isinstance(spec, list) else []
    return next((s for s in specs if isinstance(s, str) and _is_remote(s)), None)


def _is_remote(shard: str) -> bool:
    return shard.lstrip().lower().startswith(REMOTE_PREFIXES) or "://" in shard


def _fields(cls: type) -> tuple[dict[str, Any], set[str]]:
    """Every keyword argument `cls(...)` takes, through `**common` to the base classes, with
    its declared type; and those without a default."""
    fields: dict[str, Any] = {}
    required: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        hints = get_type_hints(init)
        parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        for p in parameters:
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD:
                fields.setdefault(p.name, hints[p.name])
                if p.default is p.empty:
                    required.add(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break  # the rest of the chain is not reachable by keyword
    return fields, required


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a plain value read from JSON or a checkpoint has the declared type."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is Sequence:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    return False  # a type with no plain form is never read from a file


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(hint))
    if origin is Sequence:
        return f"a list of ({_describe(get_args(hint)[0])})"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping" + (" with a _target_" if "_target_" in value else "")
    return f"{type(value).__name__} {value!r:.60}"
