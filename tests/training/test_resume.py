"""Reliability: checkpoints survive a crash mid-write, a killed run resumes exactly, and a
non-finite loss or gradient stops training or is skipped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from captioner.core.errors import ConfigError, TrainingError
from captioner.data import ShapesDataModule
from captioner.training import checkpoint_io as checkpoint_io_module
from captioner.training.checkpoint_io import SafeCheckpointIO
from captioner.training.lit_module import CaptionerLitModule, warmup_cosine_schedule
from captioner.training.tasks import train
from tests.helpers import (
    QUIET,
    ROOT,
    TINY_IMAGE_MODEL,
    Interrupted,
    Poison,
    StepProbe,
    compose_train,
    write_shards,
)


def test_a_checkpoint_write_that_dies_midway_leaves_the_last_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, path = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    writer.save_checkpoint({"global_step": 1, "w": torch.arange(1000.0)}, path)
    good = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() makes files

    def dies_midway(obj: object, file: object) -> None:
        file.write(good[: len(good) // 2])  # half a checkpoint on disk, then the process dies
        raise MemoryError("killed")

    monkeypatch.setattr(checkpoint_io_module.torch, "save", dies_midway)
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
    assert isinstance(built.strategy.checkpoint_io, SafeCheckpointIO)


RUN = (
    "experiment=shapes_tiny", "data.num_train=64", "data.batch_size=8", "data.num_val=8",
    "data.num_test=8", "trainer.max_epochs=3", "test=false", "seed=7", *QUIET,
)  # fmt: skip


def train_process(*args: str, cwd: Path, stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """`scripts/train.py` in a process of its own, with the test helpers importable; its
    stderr goes with its stdout unless `stderr` says otherwise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )  # fmt: skip


def steps_by_run(run: Path) -> list[list[tuple[int, list]]]:
    """Each run's (global step, image ids) of every training batch, in order."""
    steps: dict[int, list[tuple[int, list]]] = {}
    for line in (run / "steps.txt").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["run"], []).append((record["step"], record["images"]))
    return list(steps.values())


def assert_resumed_exactly(whole: Path, interrupted: Path, stopped: int, resumed_at: int) -> None:
    """The interrupted run trained steps 0..stopped-1, the resumed one went on from its last
    checkpoint (step `resumed_at`) on the batches of the uninterrupted run, and both end with
    bit-identical weights (CPU)."""
    (uninterrupted,) = steps_by_run(whole)
    before, after = steps_by_run(interrupted)
    total = len(uninterrupted)
    assert [step for step, _ in uninterrupted] == list(range(total))
    assert [step for step, _ in after] == list(range(resumed_at, total))
    assert before == uninterrupted[:stopped] and after == uninterrupted[resumed_at:]

    final = [
        torch.load(r / "checkpoints/last.ckpt", weights_only=True) for r in (whole, interrupted)
    ]
    assert final[0]["global_step"] == final[1]["global_step"] == total
    weights = [ckpt["state_dict"] for ckpt in final]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


# dropout on and loader processes: what a resumed run must reproduce besides the weights
EXACT = (
    "model.dropout=0.1",
    "data.num_workers=2",
    "callbacks.step_checkpoint.every_n_train_steps=5",
)
PROBE = "+callbacks.probe._target_=tests.helpers.StepProbe"


@pytest.mark.slow
def test_a_killed_run_resumes_mid_epoch_to_the_weights_of_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    """8 steps an epoch, last.ckpt every 5 steps and at epoch ends; the killed run is stopped
    with SIGKILL at step 13, 3 steps after the checkpoint of step 10 (epoch 1, batch 2), and
    resumed from `ckpt_path=last` in its own folder."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = train_process(*RUN, *EXACT, PROBE, f"hydra.run.dir={whole}", cwd=tmp_path)
    victim = train_process(
        *RUN, *EXACT, PROBE, "+callbacks.probe.pause_at_step=13", f"hydra.run.dir={killed}",
        cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "paused").exists():
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 13"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10

    resumed = train_process(
        *RUN, *EXACT, PROBE, "ckpt_path=last", f"hydra.run.dir={killed}", cwd=tmp_path
    )
    for process in (reference, resumed):
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
    assert_resumed_exactly(whole, killed, stopped=14, resumed_at=10)


@pytest.mark.slow
def test_a_sigterm_saves_the_step_under_way_and_the_run_resumes_exactly(tmp_path: Path) -> None:
    """SIGTERM (a scheduler's pre-emption) at step 13, two steps after the last periodic
    checkpoint: last.ckpt holds step 13's update, the exit status is 143, the last line says
    how to resume (no traceback), and the resumed run ends on the uninterrupted run's weights."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    reference = train_process(*RUN, *EXACT, PROBE, f"hydra.run.dir={whole}", cwd=tmp_path)
    victim = train_process(
        *RUN, *EXACT, PROBE, "+callbacks.probe.sigterm_at_step=13", f"hydra.run.dir={stopped}",
        cwd=tmp_path, stderr=subprocess.PIPE,
    )  # fmt: skip
    errors = victim.communicate(timeout=600)[1]
    assert victim.returncode == 143, errors[-3000:]
    assert "Traceback" not in errors
    line = errors.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"training error: stopped by SIGTERM after step 14 \(epoch 1\); saved "
        rf"{stopped}/checkpoints/last.ckpt. Resume with ckpt_path=last hydra.run.dir={stopped}",
        line,
    ), line
    assert torch.load(stopped / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 14
    resumed = train_process(
        *RUN, *EXACT, PROBE, "ckpt_path=last", f"hydra.run.dir={stopped}", cwd=tmp_path
    )
    for process in (reference, resumed):
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
    assert_resumed_exactly(whole, stopped, stopped=14, resumed_at=14)


@pytest.mark.parametrize("epoch_samples", ["null", "64"], ids=["whole-shards", "epoch_samples"])
@pytest.mark.slow
def test_a_run_on_shards_resumes_mid_epoch_exactly(epoch_samples: str, tmp_path: Path) -> None:
    """A shard stream cannot seek: the resumed run reads past the batches it trained on, and
    loader processes draw each sample's crop and caption from where it is in their stream."""
    paths = {
        "train_shards": write_shards(tmp_path, "train", shards=4, per_shard=16),
        "val_shards": write_shards(tmp_path, "val", shards=1, per_shard=4),
    }
    run = (
        "data=webdataset", *(f"data.{k}='{v}'" for k, v in paths.items()), *TINY_IMAGE_MODEL,
        "data.batch_size=8", "data.shuffle_buffer=10", f"data.epoch_samples={epoch_samples}",
        "trainer.max_epochs=2", "seed=7", "test=false", *QUIET, *EXACT, PROBE,
    )  # fmt: skip
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(compose_train(*run, output_dir=whole))
    with pytest.raises(Interrupted):
        train(compose_train(*run, "+callbacks.probe.fail_at_step=7", output_dir=stopped))
    assert torch.load(stopped / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 5
    train(compose_train(*run, "ckpt_path=last", output_dir=stopped))
    assert_resumed_exactly(whole, stopped, stopped=7, resumed_at=5)


def test_a_run_extended_past_its_max_steps_goes_on_with_the_next_batch(tmp_path: Path) -> None:
    """A run ended by `trainer.max_steps` mid-epoch and resumed with a larger one trains on the
    batches a longer run would have (Lightning continues the epoch but numbers it as the next
    one to samplers, which `EpochShuffle` therefore ignores)."""
    whole, short = tmp_path / "whole", tmp_path / "short"
    train(compose_train(*RUN, PROBE, "trainer.max_steps=12", output_dir=whole))
    train(compose_train(*RUN, PROBE, "trainer.max_steps=10", output_dir=short))
    train(compose_train(*RUN, PROBE, "trainer.max_steps=12", "ckpt_path=last", output_dir=short))
    (longer,) = steps_by_run(whole)
    assert steps_by_run(short) == [longer[:10], longer[10:]]


class LateRestore(SingleDeviceStrategy):
    """Restores checkpoints after setup, as FSDP and DeepSpeed do: the train loader has been
    built (for the scheduler's step count) before the datamodule learns where training was."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_a_strategy_that_restores_after_setup_resumes_at_the_checkpoints_batch(
    tmp_path: Path,
) -> None:
    def run(fail_at: int | None = None, ckpt: Path | None = None) -> None:
        seed_everything(7)
        dm = ShapesDataModule(image_size=32, num_train=64, num_val=4, num_test=4, batch_size=8)
        module = CaptionerLitModule(
            dm.tokenizer, dm.preprocess.to_dict(), torch.optim.AdamW,
            partial(warmup_cosine_schedule, warmup_steps=2), image_size=32, patch_size=8,
            encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=1,
            decoder_heads=2, max_len=24, dropout=0.1,
        )  # fmt: skip
        folder = tmp_path / ("whole" if ckpt is None and fail_at is None else "stopped")
        savers = [  # as conf/callbacks/default.yaml: last.ckpt every 5 steps and at epoch ends
            ModelCheckpoint(folder / "checkpoints", "last", enable_version_counter=False, **every)
            for every in ({"every_n_train_steps": 5}, {"every_n_epochs": 1})
        ]
        trainer = Trainer(
            strategy=LateRestore(torch.device("cpu")), max_epochs=2, limit_val_batches=0,
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=folder, callbacks=[*savers, StepProbe(fail_at_step=fail_at)],
        )  # fmt: skip
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)

    run()
    with pytest.raises(Interrupted):
        run(fail_at=13)
    run(ckpt=tmp_path / "stopped" / "checkpoints" / "last.ckpt")
    assert_resumed_exactly(tmp_path / "whole", tmp_path / "stopped", stopped=13, resumed_at=10)


def test_resuming_names_a_missing_checkpoint_and_the_fix(tmp_path: Path) -> None:
    cfg = compose_train("experiment=shapes_tiny", "ckpt_path=last", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"ckpt_path=last: there is no last.ckpt in .*hydra.run"):
        train(cfg)
    missing = tmp_path / "nope.ckpt"
    cfg = compose_train("experiment=shapes_tiny", f"ckpt_path={missing}", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"ckpt_path={missing}: no such checkpoint file"):
        train(cfg)


def guarded_run(
    nonfinite: str, what: str, tmp_path: Path
) -> tuple[CaptionerLitModule, list[dict[str, torch.Tensor]]]:
    """Six steps of a tiny model with step 2 poisoned; returns it and its weights after
    every step."""
    torch.manual_seed(0)
    dm = ShapesDataModule(image_size=32, num_train=48, num_val=4, num_test=4, batch_size=8)
    module = CaptionerLitModule(
        dm.tokenizer, dm.preprocess.to_dict(), torch.optim.AdamW, nonfinite=nonfinite,
        image_size=32, patch_size=8, encoder_dim=32, encoder_depth=1, encoder_heads=2,
        decoder_dim=32, decoder_depth=1, decoder_heads=2, max_len=24,
    )  # fmt: skip
    weights: list[dict[str, torch.Tensor]] = []

    class Snapshot(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            weights.append({k: v.clone() for k, v in module.state_dict().items()})

    trainer = Trainer(
        max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[Poison(2, what), Snapshot()],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return module, weights


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_nonfinite_step_stops_training_naming_the_step_and_batch(
    what: str, tmp_path: Path
) -> None:
    with pytest.raises(TrainingError, match=rf"non-finite {what} at step 2 \(epoch 0.*images \d+"):
        guarded_run("stop", what, tmp_path)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_nonfinite_step_can_be_skipped(what: str, tmp_path: Path) -> None:
    module, weights = guarded_run("skip", what, tmp_path)
    assert len(weights) == 6  # every batch ran
    for name, before in weights[1].items():
        assert torch.equal(weights[2][name], before), name  # the poisoned step changed nothing
    changed = [not torch.equal(weights[3][k], weights[2][k]) for k in weights[2]]
    assert any(changed)  # and training went on
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.slow
def test_a_nonfinite_loss_ends_the_run_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    process = train_process(
        *RUN, "+callbacks.poison._target_=tests.helpers.Poison", "+callbacks.poison.step=10",
        f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 2, output[-3000:]
    assert "training error: non-finite loss at step 10 (epoch 1, batch 2), images " in output
    assert "Traceback" not in output
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8  # the end of epoch 0: the last good state
    assert all(torch.isfinite(w).all() for w in last["state_dict"].values())


@pytest.mark.slow
def test_the_same_seed_and_config_give_the_same_metrics(tmp_path: Path) -> None:
    overrides = (
        "experiment=shapes_tiny", "data.num_train=64", "data.batch_size=8", "data.num_val=8",
        "data.num_test=8", "trainer.max_epochs=2", "trainer.deterministic=true", "seed=3",
        "callbacks.attention_samples=null", "callbacks.rich_progress_bar=null",
    )  # fmt: skip
    runs = [train(compose_train(*overrides, output_dir=tmp_path / str(i)))[0] for i in range(2)]
    for metrics in runs:  # the clock's, not the run's
        del metrics["train/seconds"], metrics["train/images_per_s"]
    assert runs[0] == runs[1] and "test/CIDEr" in runs[0] and "test/loss" in runs[0]
    other = train(compose_train(*overrides, "seed=4", output_dir=tmp_path / "other"))[0]
    assert other["test/loss"] != runs[0]["test/loss"]  # the seed does reach the run


def test_training_batches_do_not_depend_on_the_loader_processes() -> None:
    """Order and per-sample draws come from the run's seed, not from the process reading."""
    epochs = []
    for workers in (0, 2):
        torch.manual_seed(11)
        dm = ShapesDataModule(image_size=32, num_train=24, batch_size=4, num_workers=workers)
        loader = dm.train_dataloader()
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            epochs.append([(b["image_ids"], b["tokens"].tolist()) for b in loader])
    assert epochs[0] == epochs[2] and epochs[1] == epochs[3]  # workers 0 and 2, each epoch
    assert epochs[0] != epochs[1]  # a new order every epoch
