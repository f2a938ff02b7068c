"""The DataModule a checkpoint's recorded data config describes, built without running code.

Reading a checkpoint checks its record as plain data (`captioner.core.checkpoint.record`);
building a DataModule from it checks it against the data kinds below: it must name one of
them, and every field must be a keyword argument of that kind's class with a value of the type
its signature declares (numbers, strings, lists of them). Nothing else is accepted.
"""

from __future__ import annotations

from typing import Any

from captioner.core.checkpoint import CheckpointContents
from captioner.core.checkpoint.record import SHARD_KEYS, check_record, describe
from captioner.core.errors import CheckpointError, ConfigError
from captioner.core.signatures import keyword_parameters, mismatch
from captioner.data.datamodule import CaptionDataModule, ShapesDataModule
from captioner.data.files import (
    CocoDataModule,
    FlickrDataModule,
    KarpathySplitDataModule,
    TableDataModule,
)
from captioner.data.shards import WebDataModule

KINDS: dict[str, type[CaptionDataModule]] = {
    f"captioner.data.{cls.__name__}": cls
    for cls in (
        ShapesDataModule, CocoDataModule, KarpathySplitDataModule, FlickrDataModule,
        TableDataModule, WebDataModule,
    )
}  # fmt: skip


def check_data_config(config: Any) -> tuple[type[CaptionDataModule], dict[str, Any]]:
    """The class and keyword arguments a recorded data config names, each field checked
    against the class's signature; `ConfigError` names the first field that is wrong."""
    target = check_record(config)["_target_"]
    if target not in KINDS:
        raise ConfigError(
            f"data._target_: {target!r:.80} is not a data kind; expected one of {sorted(KINDS)}."
        )
    fields, required = keyword_parameters(KINDS[target])
    if missing := sorted(required - set(config)):
        raise ConfigError(f"data.{missing[0]}: missing; {target} needs {missing}.")
    kwargs = {}
    for key, value in config.items():
        if key == "_target_":
            continue
        if key in SHARD_KEYS and value is None:  # not recorded (remote), or not given
            kwargs[key] = None
            continue
        if key not in fields:
            raise ConfigError(
                f"data.{key}: not a key of {target}; expected some of {sorted(fields)}."
            )
        expected = mismatch(fields[key], value, strict=True)
        if expected is not None:
            raise ConfigError(f"data.{key}: expected {expected}, got {describe(value)}.")
        kwargs[key] = value
    return KINDS[target], kwargs


def datamodule_from_record(config: Any, **changes: Any) -> CaptionDataModule:
    """The DataModule a recorded data config describes, with `changes` (e.g. the model's
    `image_size` and `max_len`) applied on top."""
    cls, kwargs = check_data_config(config)
    return cls(**{**kwargs, **changes})


def recorded_datamodule(contents: CheckpointContents, **changes: Any) -> CaptionDataModule:
    """The data a checkpoint was trained on, rebuilt from its record (never instantiated from
    it), with `changes` applied; a record that does not describe one names the checkpoint."""
    if contents.data is None:
        raise ConfigError(
            f"{contents.source} does not record its data config: name one, e.g. data=shapes."
        )
    try:
        return datamodule_from_record(contents.data, **changes)
    except ConfigError as err:
        raise CheckpointError(f"{contents.source}: its recorded {err}") from None
