"""The data config a checkpoint records, read back as data, never as code.

Training keeps its data config in every checkpoint, so that evaluation finds the test split
without being told. A file can be written by anyone, so what it says is never handed to
`hydra.utils.instantiate`. When a checkpoint is read, its record must be plain data: a
mapping of data keys to numbers, strings, booleans, nulls and lists of them, with no mapping
inside (no `_target_` below the top level) and no Hydra keys. Shards read through a command
(`pipe:`) or from a URL are never recorded by training and never accepted from a file: the
user names them on the command line, where they are the user's own.

Which data kinds there are, and which keys and value types each takes, is the data layer's
knowledge: `captioner.data.stored` checks the record against the DataModule's signature when a
DataModule is built from it (evaluation, notebooks), and nothing else ever builds one.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

from braceexpand import UnbalancedBracesError, braceexpand

from captioner.core.errors import ConfigError
from captioner.core.values import is_finite, is_int, key_name, short

SHARD_KEYS = ("train_shards", "val_shards", "test_shards")
MAX_SHARDS = 1_000_000  # a recorded shard pattern may name at most this many
MAX_DEPTH = 3  # lists of lists of lists at most (data.holdout_combos: a list of pairs)
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def record_data_config(config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint keeps of the run's (resolved) data config: all of it, except shard
    lists that may be read through a command or from a URL (any holding a colon), which become
    null (not recorded)."""
    recorded = dict(config)
    for key in SHARD_KEYS:
        if any(map(_not_local, _specs(recorded.get(key)))):
            recorded[key] = None
    return recorded


def check_record(config: Any) -> dict[str, Any]:
    """`config` itself if it is a recorded data config made of plain data, else a
    `ConfigError` naming the first key that is not."""
    if not isinstance(config, dict):
        raise ConfigError(f"data: expected a mapping of data keys, got {describe(config)}.")
    target = config.get("_target_")
    if not isinstance(target, str):
        raise ConfigError(f"data._target_: expected the name of a data kind, got {short(target)}.")
    for key, value in config.items():
        if key == "_target_":
            continue
        if not (isinstance(key, str) and key.isidentifier()) or key in HYDRA_KEYS:
            hint = " (Hydra keys are never read from a file)" if key in HYDRA_KEYS else ""
            raise ConfigError(f"data.{key_name(key)}: not a data key{hint}.")
        if not _plain(value, 0):
            raise ConfigError(
                f"data.{key}: expected a number, string, boolean, null or a list of them, got "
                f"{describe(value)}."
            )
        if key in SHARD_KEYS:
            _check_local_shards(key, value)
    return config


def describe(value: Any) -> str:
    """A value read from a file as an error message names it."""
    if isinstance(value, dict):
        return "a mapping" + (" with a _target_" if "_target_" in value else "")
    return f"{type(value).__name__} {short(value)}"


def _plain(value: Any, depth: int) -> bool:
    if isinstance(value, list):
        return depth < MAX_DEPTH and all(_plain(item, depth + 1) for item in value)
    if is_int(value):
        return abs(value) < 2**63  # what torch and numpy take
    return value is None or isinstance(value, bool | str) or is_finite(value)


def _specs(spec: Any) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, list) else []


def _not_local(spec: Any) -> bool:
    """A shard spec that may name something other than local files: one holding a scheme
    (`pipe:`, `http:`, `s3:`, ...) in any spelling brace expansion turns into one
    (`pip{e,e}:`, `http:/{/,/}host`), or standard input (`-`). No brace expansion makes a
    colon out of none, so looking for one is enough."""
    return isinstance(spec, str) and (":" in spec or spec.strip() == "-")


def _check_local_shards(key: str, spec: Any) -> None:
    """Recorded shards name local files only, and not more of them than a real dataset has."""
    for pattern in _specs(spec):
        if not isinstance(pattern, str):
            continue  # a value of the wrong type: named when the DataModule is built
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
