"""A training run folder is accepted wherever a checkpoint is, read as its `checkpoints/last.ckpt`
and named; an export folder stays an export; a folder that is neither is one named error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from captioner.core.checkpoint import LAST, export, load_checkpoint, resolve_checkpoint
from captioner.core.errors import CheckpointError
from captioner.core.inference import Captioner
from tests.helpers import run_script


def test_a_run_folder_is_read_as_its_last_checkpoint_and_named(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    last = trained_run / LAST
    for folder in (trained_run, last.parent):  # the run, or its checkpoint folder
        path, note = resolve_checkpoint(folder)
        assert path == last and note is not None and str(last) in note and "\n" not in note
    with caplog.at_level(logging.INFO, logger="captioner.core.checkpoint"):
        assert load_checkpoint(trained_run).source == last
    assert [r.getMessage() for r in caplog.records] == [resolve_checkpoint(trained_run)[1]]
    exported = export(load_checkpoint(last), tmp_path / "exported")[0].parent
    for given in (last, exported, exported / "model.safetensors", tmp_path / "missing"):
        assert resolve_checkpoint(given) == (given, None)  # read as given


def test_a_folder_that_is_neither_a_run_nor_an_export_is_one_named_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    message = str(error.value)
    assert f"neither a training run folder (no {LAST})" in message and "\n" not in message
    assert "nor an export folder (no model.safetensors)" in message
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch_001-step_10.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"holds checkpoints/epoch_001-step_10\.ckpt"):
        Captioner.from_checkpoint(tmp_path)  # no last.ckpt: the files it holds are named


@pytest.mark.slow
def test_the_scripts_take_a_run_folder_and_name_the_file_read(
    trained_run: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from captioner.data import ShapesWorld

    world = ShapesWorld(image_size=(32, 48), max_objects=2)
    Image.fromarray(world.render(world.scene("test", 0))).save(tmp_path / "0.png")
    named = f"{trained_run} is a training run folder: reading {trained_run / LAST}"
    captioned = run_script("caption.py", "--ckpt", trained_run, tmp_path / "0.png", cwd=tmp_path)
    assert captioned.returncode == 0 and captioned.stdout.count("\t") == 1, captioned.stderr
    assert captioned.stderr.splitlines() == [named]
    exported = run_script("export.py", "--ckpt", trained_run, "--out", tmp_path / "x", cwd=tmp_path)
    assert exported.returncode == 0 and exported.stderr.splitlines() == [named], exported.stderr
    assert load_checkpoint(tmp_path / "x").kind == "export"
    (tmp_path / "empty").mkdir()
    empty = run_script("caption.py", "--ckpt", tmp_path / "empty", "0.png", cwd=tmp_path)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1, empty.stderr
    assert "neither a training run folder" in empty.stderr and "Traceback" not in empty.stderr
