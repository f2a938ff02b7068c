"""Reliability: checkpoints survive a crash mid-write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate

from captioner import checkpoint as checkpoint_module
from captioner.checkpoint import AtomicCheckpointIO


def test_a_checkpoint_write_that_dies_midway_leaves_the_last_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    writer.save_checkpoint({"global_step": 1, "w": torch.arange(1000.0)}, path)
    good = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() makes files

    def dies_midway(obj: object, file: object) -> None:
        file.write(good[: len(good) // 2])  # half a checkpoint on disk, then the process dies
        raise MemoryError("killed")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_midway)
    with pytest.raises(MemoryError):
        writer.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == good  # the previous checkpoint, whole
    assert os.listdir(path.parent) == ["last.ckpt"]  # and no half-written file left beside it
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("trainer", ["default", "ddp_sim"])
def test_every_trainer_config_writes_checkpoints_atomically(trainer: str, tmp_path: Path) -> None:
    cfg = compose_train(f"trainer={trainer}", output_dir=tmp_path)
    built = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO)
