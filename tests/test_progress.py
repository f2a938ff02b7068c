"""Long jobs show how far they are on a terminal and nothing else when their output goes
elsewhere: a bar on stderr for `scripts/caption.py` and `scripts/eval.py` only when stderr is a
terminal, so piped runs write their results and not one byte of progress."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning import Trainer
from lightning.pytorch.callbacks import ProgressBar

from tests.helpers import ROOT, compose_train, run_caption, scene

CAPTION = [sys.executable, str(ROOT / "scripts" / "caption.py")]
EVAL = [sys.executable, str(ROOT / "scripts" / "eval.py")]
BAR_TRACES = ("\r", "\x1b", "it/s", "images/s", "━━")  # what a drawn bar leaves behind


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Five images, captioned two at a time below: the bar moves more than once."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        scene(i).save(folder / f"{i}.png")
    return folder


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: every process holding the terminal has closed it
        return b""


def on_terminal(command: list[str], cwd: Path) -> tuple[int, bytes, str]:
    """`command` with stderr on a pseudo-terminal and stdout to a file, as in `cmd > out`:
    (exit status, stdout, what the terminal received, without colours and cursor moves)."""
    master, slave = os.openpty()
    with open(cwd / "stdout", "w+b") as stdout:
        process = subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=slave)
        os.close(slave)
        shown = b"".join(iter(lambda: _read(master), b""))
        os.close(master)
        status = process.wait()
        stdout.seek(0)
        return status, stdout.read(), re.sub(r"\x1b\[[\d;?]*[A-Za-z]", "", shown.decode())


@pytest.mark.parametrize("options", [[], ["--json"]], ids=["tsv", "json"])
@pytest.mark.slow
def test_caption_draws_a_bar_on_a_terminal_and_nothing_when_piped(
    options: list[str], ckpt: Path, images: Path, tmp_path: Path
) -> None:
    args = ["--ckpt", str(ckpt), "--batch-size", "2", *options, str(images)]
    status, out, shown = on_terminal([*CAPTION, *args], cwd=tmp_path)
    assert status == 0, shown
    assert re.search(r"captioning ━+ 5/5 100% \d+\.\d images/s, took \d:\d\d:\d\d", shown), shown

    piped = run_caption(*args, cwd=tmp_path)
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    assert piped.stdout == out  # the bar left stdout as it was
    paths = [f"{images}/{i}.png" for i in range(5)]
    if options:
        assert [item["image"] for item in json.loads(out)] == paths
    else:
        rows = [line.split("\t") for line in out.decode().splitlines()]
        assert [row[0] for row in rows] == paths and all(len(row) == 2 and row[1] for row in rows)


@pytest.mark.slow
def test_no_progress_keeps_a_terminal_free_of_the_bar(
    ckpt: Path, images: Path, tmp_path: Path
) -> None:
    status, out, shown = on_terminal(
        [*CAPTION, "--ckpt", str(ckpt), "--no-progress", str(images)], cwd=tmp_path
    )
    assert status == 0 and out.count(b"\n") == 5 and shown == "", shown


@pytest.mark.slow
def test_eval_draws_lightnings_bar_on_a_terminal_and_nothing_when_piped(
    ckpt: Path, tmp_path: Path
) -> None:
    args = [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}"]
    status, out, shown = on_terminal([*EVAL, *args], cwd=tmp_path)
    assert status == 0, shown[-3000:]
    assert re.search(r"Testing ━+ (\d+)/\1 .* \d+\.\d+it/s", shown), shown[-3000:]
    assert b"Testing" not in out and b"headline metrics" in out

    piped = subprocess.run([*EVAL, *args], cwd=tmp_path, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "headline metrics" in piped.stdout and "Testing" not in piped.stdout
    assert "Testing" not in piped.stderr
    assert not [trace for trace in BAR_TRACES if trace in piped.stderr], piped.stderr


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_the_trainer_flag_still_turns_the_bar_off(config_name: str, tmp_path: Path) -> None:
    """`+trainer.enable_progress_bar=false` (as the notebooks pass) beside the configs' bar:
    Lightning refuses a progress bar callback with that flag, so none is built."""
    cfg = compose_train(
        "ckpt_path=x", "+trainer.enable_progress_bar=false", output_dir=tmp_path,
        config_name=config_name,
    )  # fmt: skip
    callback = instantiate(cfg.callbacks.rich_progress_bar)
    assert not isinstance(callback, ProgressBar)
    trainer = Trainer(callbacks=[callback], enable_progress_bar=False, logger=False)
    assert trainer.progress_bar_callback is None
