"""Checkpoints are data, and nothing in them ever runs: reading (`reading`: a `.ckpt` without
unpickling code), checking every part (`contents`, `record`) and exporting (`export`)."""

from captioner.core.checkpoint.contents import (
    CONFIG_NAME,
    FORMAT_VERSION,
    LAST,
    OBJECTIVES,
    WEIGHTS_NAME,
    CheckpointContents,
    checkpoint_record,
    load_checkpoint,
    load_trusted_pickle,
    resolve_checkpoint,
)
from captioner.core.checkpoint.export import export
from captioner.core.checkpoint.reading import read_torch_checkpoint
from captioner.core.checkpoint.record import check_record, record_data_config

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "LAST",
    "OBJECTIVES",
    "WEIGHTS_NAME",
    "CheckpointContents",
    "check_record",
    "checkpoint_record",
    "export",
    "load_checkpoint",
    "load_trusted_pickle",
    "read_torch_checkpoint",
    "record_data_config",
    "resolve_checkpoint",
]
