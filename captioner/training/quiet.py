"""Lightning's warnings and start-up lines that no user of this package can act on, silenced
around the calls that raise them (fitting, validating, testing) and nowhere else."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

WARNINGS = (
    # single-process loading is the right choice for procedural data on a small CPU
    ".*does not have many workers.*",
    ".*treespec, LeafSpec.*",  # Lightning internals on new torch
    # the datamodule keeps its place in the data in every checkpoint (`state_dict`)
    ".*your dataloader is not resumable.*",
    # evaluation metrics are computed once, on rank 0, and broadcast: identical on every rank
    # without the reduction Lightning suggests for per-rank values
    r".*`self\.log\('(val|test)\w*/.*sync_dist=True.*",
    # a frozen encoder's parts stay in eval mode on purpose (`ImageEncoder.train`)
    r".*module\(s\) in eval mode at the start of training.*",
)
LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _Unactionable(logging.Filter):
    NOISE = ("💡 Tip", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Inside: Lightning's warnings in `WARNINGS` and its tips are not shown."""
    noise = _Unactionable()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for pattern in WARNINGS:
                warnings.filterwarnings("ignore", pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
