"""Where a training run starts and how it goes on: resuming a checkpoint of its own
(`ckpt_path`), starting from another checkpoint's weights (`init_from`), never training over
another run's checkpoints, and naming a checkpoint that cannot be restored."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from captioner.core.checkpoint import CheckpointContents, load_checkpoint, resolve_checkpoint
from captioner.core.errors import CheckpointError, ConfigError, DataError, TrainingError, first_line
from captioner.core.models import CaptionerConfig, CaptionerModel

log = logging.getLogger(__name__)


@dataclass
class Start:
    """Where a run starts: from `ckpt_path`, a checkpoint it goes on from (`resumed`), from the
    weights of `weights` with a new optimizer, schedule and data order, or from scratch."""

    ckpt_path: Path | None = None
    resumed: CheckpointContents | None = None
    weights: CheckpointContents | None = None

    @property
    def source(self) -> CheckpointContents | None:
        """The checkpoint whose vocabulary the run keeps, if any."""
        return self.resumed or self.weights

    def prepare(self, net: CaptionerModel, config: CaptionerConfig) -> None:
        """Check that `net`, built as `config`, is the model the checkpoint holds, and load the
        starting weights into it (a resumed run's come from Lightning's restore)."""
        if self.resumed is not None:
            _check_same_architecture(
                self.resumed, config, "ckpt_path",
                "resume with the settings it was trained with, or start a new run",
            )  # fmt: skip
        if self.weights is not None:
            _check_same_architecture(
                self.weights, config, "init_from",
                "give this run its architecture to start from its weights",
            )  # fmt: skip
            self.weights.load_into(net)
            if rank_zero_only.rank == 0:
                log.info("starting from the weights of %s", self.weights.source)


def starting_point(cfg: DictConfig, folders: list[Path]) -> Start:
    """Where the run `cfg` starts, every checkpoint it names read and checked before anything
    runs. A cross-entropy checkpoint given to self-critical training is a start from its
    weights, not a resume."""
    ckpt_path = _resume_from(cfg.get("ckpt_path"), folders)
    start = Start(
        ckpt_path,
        None if ckpt_path is None else _resumable(ckpt_path),
        _starting_weights(cfg.get("init_from")),
    )
    if (
        start.resumed is not None and start.resumed.objective == "cross_entropy"
        and cfg.model.get("scst") is not None and cfg.get("train", True)
    ):  # fmt: skip
        log.info(
            "%s was trained with cross-entropy: self-critical training starts from its weights "
            "with a new optimizer, schedule and data order (ckpt_path=last resumes this run)",
            ckpt_path,
        )  # fmt: skip
        return Start(weights=start.resumed)
    if start.resumed is not None and start.weights is not None:
        log.info("init_from=%s is not used: resuming from %s", cfg.init_from, ckpt_path)
        start.weights = None
    return start


def written_checkpoint(trainer: L.Trainer, folders: list[Path]) -> Path | None:
    """The run's best checkpoint, else its newest `last.ckpt`: what to caption and score with."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        return Path(best)
    found = [folder / "last.ckpt" for folder in folders if (folder / "last.ckpt").is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def checkpoint_folders(callbacks: list[Any]) -> list[Path]:
    """Where this run's checkpoint callbacks write."""
    dirpaths = {c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath}
    return sorted(map(Path, dirpaths))


def _resume_from(ckpt_path: str | None, folders: list[Path]) -> Path | None:
    """The checkpoint `ckpt_path` names: `last` is the newest `last.ckpt` in this run's
    checkpoint folders, so a run resumes in its own folder."""
    if not ckpt_path:
        return None
    if str(ckpt_path) != "last":
        path, note = resolve_checkpoint(ckpt_path)  # a run folder: its last.ckpt
        if note is not None:
            log.info(note)
        if path.is_dir():
            return path  # an export folder: `_resumable` says why training cannot go on from it
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path}: no such checkpoint file; give the path of a .ckpt or "
                "a run folder, or ckpt_path=last to resume the run in hydra.run.dir."
            )
        return path
    found = [folder / "last.ckpt" for folder in folders if (folder / "last.ckpt").is_file()]
    if not found:
        where = ", ".join(map(str, folders)) or "no checkpoint folder"
        raise ConfigError(
            f"ckpt_path=last: there is no last.ckpt in {where}. To resume a run, run in its "
            "folder: hydra.run.dir=<the run's folder> ckpt_path=last (or ckpt_path=<file>)."
        )
    return max(found, key=lambda path: path.stat().st_mtime)


def _resumable(path: Path) -> CheckpointContents:
    """The checkpoint at `path`, checked to be one training can go on from."""
    contents = load_checkpoint(path)
    if contents.kind != "lightning":
        raise ConfigError(
            f"ckpt_path={path}: an export holds the weights only, not the optimizer, schedule "
            "and data position that train.py needs; give a .ckpt of scripts/train.py "
            "(<run>/checkpoints/last.ckpt), or score the export with scripts/eval.py."
        )
    return contents


def _starting_weights(init_from: str | None) -> CheckpointContents | None:
    """The checkpoint (a .ckpt, a run folder or an export) whose weights a new run starts
    from: fine-tuning, or self-critical training after cross-entropy."""
    if not init_from:
        return None
    path, note = resolve_checkpoint(init_from)
    if note is not None:
        log.info(note)
    if not path.exists():
        raise ConfigError(
            f"init_from={init_from}: no such checkpoint; give the path of a .ckpt, a run folder "
            "or a folder written by scripts/export.py."
        )
    return load_checkpoint(path)


def _check_same_architecture(
    contents: CheckpointContents, config: CaptionerConfig, key: str, fix: str
) -> None:
    """Resuming, or starting from a checkpoint's weights, needs the model the checkpoint was
    trained as (dropout may change): name every key that differs."""
    theirs = _flat(contents.config.to_dict())
    ours = _flat(config.without_downloads().to_dict())  # the weights come from the checkpoint
    changed = [key for key in ours if ours[key] != theirs.get(key) and key != "dropout"]
    if changed:
        names = {k: "data.image_size" if k == "encoder.image_size" else f"model.{k}" for k in ours}
        differences = ", ".join(f"{names[k]}={theirs[k]} (this run: {ours[k]})" for k in changed)
        raise ConfigError(f"{key}={contents.source} was trained with {differences}: {fix}.")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"encoder": {"dim": 64}} -> {"encoder.dim": 64}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_run_folders(folders: list[Path], ckpt_path: Path | None) -> None:
    """Refuse to train over another run's checkpoints: a folder that holds a `last.ckpt` goes
    on only from a checkpoint of its own (`ckpt_path=last`); a new run there would replace it.
    """
    for folder in folders:
        own = ckpt_path is not None and ckpt_path.resolve().parent == folder.resolve()
        if (folder / "last.ckpt").is_file() and not own:
            raise ConfigError(
                f"{folder} already holds the checkpoints of a run (last.ckpt): resume it with "
                "ckpt_path=last, or train in a fresh folder (hydra.run.dir=... or the default, "
                "a new folder per run)."
            )


class TrainingStarted(Callback):
    """Whether `fit` got past restoring its checkpoint and through one whole training step,
    where the restored optimizer and scheduler states are first used: the next batch, or the
    end of the epoch, comes after it."""

    def __init__(self) -> None:
        self.batches, self.started = 0, False

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.started, self.batches = self.started or self.batches > 0, self.batches + 1

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.started = self.started or self.batches > 0


@contextmanager
def restore_errors(ckpt_path: Path | None, progress: TrainingStarted) -> Iterator[None]:
    """Lightning restores optimizer, loop and callback states from the checkpoint as they are:
    a damaged or forged one fails inside it, or in the first step that uses it. Such a
    failure, before a step has gone through, is named as the checkpoint's (with the error).
    Without a checkpoint, Lightning's own refusal of a setting at start-up (its message names
    the setting and the fix) is a `ConfigError`."""
    try:
        yield
    except (ConfigError, DataError, CheckpointError, TrainingError):
        raise
    except Exception as err:
        line = first_line(err)
        if ckpt_path is None and not progress.started and _lightning_refusal(err):
            raise ConfigError(f"the trainer settings: {line}") from None
        if ckpt_path is None or progress.started:
            raise
        raise CheckpointError(
            f"{ckpt_path}: training could not be restored from it ({type(err).__name__}: "
            f"{line[:200]}); the file is damaged, or was written by other code."
        ) from None


def _lightning_refusal(err: Exception) -> bool:
    """A ValueError or MisconfigurationException raised by Lightning's own code."""
    if not isinstance(err, ValueError | MisconfigurationException):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}lightning{os.sep}" in frames[-1].filename
