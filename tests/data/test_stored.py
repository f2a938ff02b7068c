"""A checkpoint's recorded data config: read as plain data with the checkpoint, checked against
its DataModule's signature when a DataModule is built from it, and never run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from captioner.core.checkpoint import check_record, load_checkpoint
from captioner.core.errors import CheckpointError, ConfigError
from captioner.data import ShapesDataModule
from captioner.data.stored import check_data_config, recorded_datamodule


def with_data(trained_run: Path, tmp_path: Path, data: dict[str, Any] | None) -> Path:
    saved = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    saved["captioner"]["data"] = data
    path = tmp_path / "changed.ckpt"
    torch.save(saved, path)
    return path


def test_what_training_records_builds_the_data_it_trained_on(trained_run: Path) -> None:
    contents = load_checkpoint(trained_run)
    datamodule = recorded_datamodule(contents, max_len=contents.config.max_len)
    assert isinstance(datamodule, ShapesDataModule)
    assert datamodule.world.image_size == contents.config.image_size
    assert check_data_config(contents.data)[0] is ShapesDataModule


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"num_test": "12"}, "data.num_test: expected an integer, got str '12'"),
        ({"grid": True}, "data.grid: expected an integer, got bool True"),
        ({"colours": 3}, "data.colours: not a key of captioner.data.ShapesDataModule"),
        ({"_target_": "captioner.data.Other"}, "data._target_: 'captioner.data.Other' is not a"),
    ],
)
def test_a_record_of_plain_values_loads_and_is_checked_when_its_data_is_built(
    change: dict[str, Any], error: str, trained_run: Path, tmp_path: Path
) -> None:
    """The core reads the record as data, knowing no DataModule: a plain value of the wrong
    type costs captioning nothing, and building the data names the field and the checkpoint."""
    data = {**load_checkpoint(trained_run).data, **change}
    path = with_data(trained_run, tmp_path, data)
    contents = load_checkpoint(path)  # captioning needs no data config
    with pytest.raises(CheckpointError, match=f"{path}: its recorded {error}"):
        recorded_datamodule(contents)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ([1, 2], "data: expected a mapping of data keys, got list"),
        ({"num_test": 3}, "data._target_: expected the name of a data kind"),
        ({"_target_": "x", "seed": {"a": 1}}, "data.seed: expected a number, string, .*mapping"),
        ({"_target_": "x", "_partial_": True}, "data._partial_: not a data key .Hydra keys"),
        ({"_target_": "x", "seed": [[[[1]]]]}, "data.seed: expected a number"),
        ({"_target_": "x", "seed": 2**64}, "data.seed: expected a number"),
        ({"_target_": "x", "seed": float("nan")}, "data.seed: expected a number"),
        ({"_target_": "x", 3: 1}, "data.3: not a data key"),
    ],
)
def test_a_record_that_is_not_plain_data_is_refused_with_the_checkpoint(
    data: Any, error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        check_record(data)


def test_a_checkpoint_without_a_record_names_a_data_config_to_give(
    trained_run: Path, tmp_path: Path
) -> None:
    contents = load_checkpoint(with_data(trained_run, tmp_path, None))
    with pytest.raises(ConfigError, match="does not record its data config: name one"):
        recorded_datamodule(contents)
