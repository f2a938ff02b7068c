"""Shared fixtures: composed Hydra configs and tiny models, built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from captioner.models import CaptionerConfig, CaptionerModel
from captioner.tasks import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

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


def compose_train(*overrides: str, output_dir: Path, config_name: str = "train") -> DictConfig:
    """The config `scripts/train.py` (or another script's) would run, writing everything
    under `output_dir`."""
    return compose_config(config_name, overrides, output_dir)


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    return lambda *overrides: compose_train(*overrides, output_dir=tmp_path)


def tiny_config(decoder: str = "cross", cross_every: int = 1, **changes: object) -> CaptionerConfig:
    """A tiny non-square model's config; `changes` in the flat names of the first checkpoint
    format (`encoder_dim`, `decoder_depth`, ...) or as `encoder.key` / `decoder.key` for the
    newer keys, `decoder` the decoder's kind."""
    values: dict = dict(
        vocab_size=23, image_size=(16, 24), patch_size=4, encoder_dim=32, encoder_depth=2,
        encoder_heads=4, decoder_dim=24, decoder_depth=2, decoder_heads=2, max_len=12,
    )  # fmt: skip
    nested = {key: changes.pop(key) for key in list(changes) if "." in key}
    values.update(changes)
    config = CaptionerConfig.from_dict(values)
    config.decoder.kind, config.decoder.cross_every = decoder, cross_every
    for key, value in nested.items():
        part, name = key.split(".")
        setattr(getattr(config, part), name, value)
    config.validate()
    return config


# The ways a decoder reads the image: every invariant of a caption decoder holds for each.
# Attention variants: 4 decoder heads over 1 (MQA) or 2 (GQA) key/value heads, rotary word
# positions and 2-D rotary patch positions.
_MQA_ROPE = {
    "decoder_heads": 4, "decoder.kv_heads": 1, "decoder.pos_embed": "rope",
    "encoder.kv_heads": 1, "encoder.pos_embed": "rope",
}  # fmt: skip
_GQA_ROPE = {**_MQA_ROPE, "decoder.kv_heads": 2, "encoder.kv_heads": 2}
FUSIONS = {
    "cross": {}, "cross_every_2": {"cross_every": 2}, "prefix": {"decoder": "prefix"},
    "cross_mqa_rope": _MQA_ROPE, "prefix_gqa_rope": {"decoder": "prefix", **_GQA_ROPE},
}  # fmt: skip


def open_gates(model: CaptionerModel, value: float = 0.5) -> CaptionerModel:
    """Gated cross-attention starts shut (tanh(0) = 0), blind to the image; open it as
    training would, so that tests of what the image changes can see it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("cross_gate"):
                param.fill_(value)
    return model


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
    from captioner.tasks import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    cfg = compose_train(
        "experiment=shapes_tiny", "data.image_size=[32,48]", "data.num_test=12",
        "trainer.max_epochs=2", "trainer.limit_train_batches=64", "trainer.limit_val_batches=1",
        "test=false", "~logger", "callbacks.lr_monitor=null", "callbacks.rich_progress_bar=null",
        output_dir=run_dir,
    )  # fmt: skip
    train(cfg)
    return run_dir
