"""Shared fixtures: composed Hydra configs and tiny models, built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from captioner.core.models import CaptionerModel
from tests.helpers import FUSIONS, compose_train, open_gates, tiny_config

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # workers share the cores: more threads than cores leaves OpenMP spinning, not computing;
    # processes the tests start (scripts, DDP ranks, notebook kernels) read OMP_NUM_THREADS
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker per core, at most four (each trains its own session checkpoint)."""
    return min(4, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    return lambda *overrides: compose_train(*overrides, output_dir=tmp_path)


@pytest.fixture(scope="session", params=list(FUSIONS))
def fusion_model(request: pytest.FixtureRequest) -> CaptionerModel:
    """The tiny model with each fusion (`FUSIONS`), gates opened."""
    torch.manual_seed(0)
    return open_gates(CaptionerModel(tiny_config(**FUSIONS[request.param])).eval())


@pytest.fixture(scope="session")
def tiny_model() -> CaptionerModel:
    """A non-square (16 x 24 px -> 4 x 6 patches) model with different encoder/decoder widths."""
    torch.manual_seed(0)
    return CaptionerModel(tiny_config()).eval()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a briefly trained, non-square (32 x 48 px -> 4 x 6 patches) shapes
    checkpoint: the real files that inference, export and evaluation read."""
    from captioner.training.tasks import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    cfg = compose_train(
        "experiment=shapes_tiny", "data.image_size=[32,48]", "data.num_test=12",
        "trainer.max_epochs=2", "trainer.limit_train_batches=64", "trainer.limit_val_batches=1",
        "test=false", "~logger", "callbacks.lr_monitor=null", "callbacks.rich_progress_bar=null",
        output_dir=run_dir,
    )  # fmt: skip
    train(cfg)
    return run_dir


@pytest.fixture(scope="session")
def ckpt(trained_run: Path) -> Path:
    """The trained run's `last.ckpt`."""
    return trained_run / "checkpoints" / "last.ckpt"
