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
import types
from collections.abc import Sequence
from itertools import islice
from typing import Any, Union, get_args, get_origin, get_type_hints

from braceexpand import UnbalancedBracesError, braceexpand

from captioner.data.datamodule import CaptionDataModule, ShapesDataModule
from captioner.data.files import (
    CocoDataModule,
    FlickrDataModule,
    KarpathySplitDataModule,
    TableDataModule,
)
from captioner.data.shards import WebDataModule
from captioner.errors import ConfigError
from captioner.values import is_finite, is_int, key_name, short

KINDS: dict[str, type[CaptionDataModule]] = {
    f"captioner.data.{cls.__name__}": cls
    for cls in (
        ShapesDataModule, CocoDataModule, KarpathySplitDataModule, FlickrDataModule,
        TableDataModule, WebDataModule,
    )
}  # fmt: skip
SHARD_KEYS = ("train_shards", "val_shards", "test_shards")
MAX_SHARDS = 1_000_000  # a recorded shard pattern may name at most this many
_HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def record_data_config(config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of the run's (resolved) data config: all of it, except shard
    lists that may be read through a command or from a URL (any holding a colon), which become
    null (not recorded)."""
    recorded = dict(config)
    for key in SHARD_KEYS:
        if any(map(_not_local, _specs(recorded.get(key)))):
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
            f"data._target_: {short(target)} is not a data kind; expected one of {sorted(KINDS)}."
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
                f"data.{key_name(key)}: not a key of {target}{hint}; expected some of "
                f"{sorted(fields)}."
            )
        if not _conforms(value, fields[key]):
            raise ConfigError(f"data.{key}: expected {_describe(fields[key])}, got {_kind(value)}.")
        if key in SHARD_KEYS:
            _check_local_shards(key, value)
        kwargs[key] = value
    return KINDS[target], kwargs


def datamodule_from_record(config: Any, **changes: Any) -> CaptionDataModule:
    """The DataModule a recorded data config describes, with `changes` (e.g. the model's
    `image_size` and `max_len`) applied on top."""
    cls, kwargs = check_data_config(config)
    return cls(**{**kwargs, **changes})


def _specs(spec: Any) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, list) else []


def _not_local(spec: str) -> bool:
    """A shard spec that may name something other than local files: one holding a scheme
    (`pipe:`, `http:`, `s3:`, ...) in any spelling brace expansion turns into one
    (`pip{e,e}:`, `http:/{/,/}host`), or standard input (`-`). No brace expansion makes a
    colon out of none, so looking for one is enough."""
    return ":" in spec or spec.strip() == "-"


def _check_local_shards(key: str, spec: Any) -> None:
    """Recorded shards name local files only, and not more of them than a real dataset has."""
    for pattern in _specs(spec):
        if _not_local(pattern):
            raise ConfigError(
                f"data.{key}: {short(pattern)} may name shards read through a command or from "
                "a URL, which a checkpoint may not do; name the shards on the command line "
                f"instead (data=webdataset data.{key}=...)."
            )
        try:
            too_many = next(islice(braceexpand(pattern), MAX_SHARDS, None), None) is not None
        except UnbalancedBracesError as err:
            raise ConfigError(f"data.{key}: {err}.") from None
        except RecursionError:
            raise ConfigError(f"data.{key}: braces nested too deeply to expand.") from None
        if too_many:
            raise ConfigError(f"data.{key}: {short(pattern)} names over {MAX_SHARDS:,} shards.")


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
        return is_int(value) and abs(value) < 2**63  # what torch and numpy take
    if hint is float:
        return is_finite(value)
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
    return f"{type(value).__name__} {short(value)}"
