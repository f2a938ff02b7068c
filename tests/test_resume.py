"""Reliability: checkpoints survive a crash mid-write, and a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate

from captioner import checkpoint as checkpoint_module
from captioner.checkpoint import AtomicCheckpointIO
from captioner.errors import ConfigError
from captioner.tasks import train

ROOT = Path(__file__).resolve().parents[1]


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


RUN = (
    "experiment=shapes_tiny", "data.num_train=64", "data.batch_size=8", "data.num_val=8",
    "data.num_test=8", "trainer.max_epochs=3", "test=false", "seed=7",
    "callbacks.attention_samples=null", "callbacks.rich_progress_bar=null",
    "callbacks.lr_monitor=null", "~logger",
)  # fmt: skip


def train_process(*args: str, cwd: Path) -> subprocess.Popen:
    """`scripts/train.py` in a process of its own, with the test helpers importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def steps_by_process(run: Path) -> list[list[tuple[int, list]]]:
    """Each process's (global step, image ids) of every training batch, in order."""
    steps: dict[int, list[tuple[int, list]]] = {}
    for line in (run / "steps.txt").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["pid"], []).append((record["step"], record["images"]))
    return list(steps.values())


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    """8 steps an epoch; the killed run is stopped with SIGKILL at step 11, 3 steps after the
    checkpoint of epoch 1, and resumed from `ckpt_path=last` in its own folder."""
    probe = "+callbacks.probe._target_=builders.StepProbe"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = train_process(*RUN, probe, f"hydra.run.dir={whole}", cwd=tmp_path)
    victim = train_process(
        *RUN, probe, "+callbacks.probe.pause_at_step=11", f"hydra.run.dir={killed}", cwd=tmp_path
    )
    deadline = time.monotonic() + 300
    while not (killed / "paused").exists():
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 11"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8

    resumed = train_process(*RUN, probe, "ckpt_path=last", f"hydra.run.dir={killed}", cwd=tmp_path)
    for process in (reference, resumed):
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
    (uninterrupted,) = steps_by_process(whole)
    before, after = steps_by_process(killed)
    assert [step for step, _ in uninterrupted] == list(range(24))
    assert [step for step, _ in after] == list(range(8, 24))  # from the checkpoint on
    assert before == uninterrupted[:12] and after == uninterrupted[8:]  # the same batches

    final = [torch.load(r / "checkpoints/last.ckpt", weights_only=True) for r in (whole, killed)]
    assert final[0]["global_step"] == final[1]["global_step"] == 24
    weights = [ckpt["state_dict"] for ckpt in final]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name  # bit-identical on CPU


def test_resuming_names_a_missing_checkpoint_and_the_fix(tmp_path: Path) -> None:
    cfg = compose_train("experiment=shapes_tiny", "ckpt_path=last", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"ckpt_path=last: there is no last.ckpt in .*hydra.run"):
        train(cfg)
    missing = tmp_path / "nope.ckpt"
    cfg = compose_train("experiment=shapes_tiny", f"ckpt_path={missing}", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"ckpt_path={missing}: no such checkpoint file"):
        train(cfg)
