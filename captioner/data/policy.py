"""What happens to a bad sample (a broken image, an empty caption): `data.on_bad_sample`.

`skip` drops it, counts it and logs each bad source once; `error` stops with a message naming
the source and the fix. Workers never raise for a bad sample: they hand a `BadSample` to the
main process, which applies the policy, so the message is one clean line whichever process
found it and however many workers there are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import NamedTuple

from captioner.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POLICIES = ("skip", "error")


BAD = "__bad__"  # the key under which a worker hands over a BadSample instead of a sample


class BadSample(NamedTuple):
    """One unusable entry: `source` is a file, `file:line`, `file[key]` or `shard/key`.

    A named tuple, so it rides in a batch through Lightning's input conversion (which rejects
    frozen dataclasses) and across worker processes.
    """

    source: str
    reason: str

    def message(self) -> str:
        return (
            f"{self.source}: {self.reason}. Fix or remove it, or set data.on_bad_sample=skip "
            "to drop bad samples (each is logged once and counted)."
        )


def check_policy(policy: str) -> str:
    """The policy itself, or a `ConfigError` naming the allowed values."""
    if policy not in POLICIES:
        raise ConfigError(f"data.on_bad_sample must be one of {list(POLICIES)}, got {policy!r}.")
    return policy


class BadSampleLog:
    """The main process's record of bad samples: raises under `error`, logs once under `skip`."""

    def __init__(self, policy: str) -> None:
        self.policy = check_policy(policy)
        self.skipped: dict[str, str] = {}  # source -> reason, in the order first seen
        self.quiet = False  # collect without logging (a scan reports them itself)

    def report(self, bad: Iterable[BadSample]) -> None:
        for sample in bad:
            if self.policy == "error":
                raise DataError(sample.message())
            if sample.source not in self.skipped:
                self.skipped[sample.source] = sample.reason
                if not self.quiet:
                    log.warning("skipped bad sample %s: %s", sample.source, sample.reason)

    def __len__(self) -> int:
        return len(self.skipped)
