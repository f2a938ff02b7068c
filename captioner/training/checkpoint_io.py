"""Lightning's checkpoint reader and writer, made safe: the `trainer.plugins` entry of every
training config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from captioner.core.checkpoint import read_torch_checkpoint
from captioner.core.files import TEMPORARY_SUFFIX, atomic_write


class SafeCheckpointIO(TorchCheckpointIO):
    """Reading (resuming, testing the best checkpoint) always goes through
    `read_torch_checkpoint`, whatever `weights_only` Lightning passes, which also refuses a
    checkpoint whose callback state names files outside its own folder (Lightning deletes
    such recorded files when it replaces them).

    Writing is crash-safe (`captioner.core.files`): a checkpoint is written to a temporary
    file beside its destination, synced, then renamed over it in one step. A run killed
    mid-write (pre-emption, out of memory) leaves the previous `last.ckpt` whole, never a
    truncated file in its place, and a temporary file that `remove_stale_temporaries` clears
    at the next start. Lightning's own writer goes through the system's temporary folder,
    whose final move is a copy, not an atomic rename, when that folder is on another file
    system.
    """

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_torch_checkpoint(path)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        with atomic_write(path) as file:
            torch.save(checkpoint, file)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what a writer killed mid-write left in `folder` (`.<name>.ckpt.*.tmp`);
    returns what was removed. Call before anything writes checkpoints there."""
    stale = sorted(folder.glob(f".*.ckpt.*{TEMPORARY_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
