"""The configs (`captioner/cli/conf/`, in lightning-hydra-template's layout) and the one way to
compose them outside `hydra.main`: for checking a command line before a run, for the
benchmark's presets, and for notebooks and tests, which call `captioner.training.train(cfg)`
without a Hydra app."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parent / "conf"


@contextmanager
def initialized() -> Iterator[GlobalHydra]:
    """Hydra initialised on our configs, and cleared after, so a later `hydra.main` starts
    fresh."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield GlobalHydra.instance()
    finally:
        GlobalHydra.instance().clear()


def compose(
    config_name: str, overrides: Sequence[str] = (), hydra_config: bool = False
) -> DictConfig:
    """`config_name` (train, eval, validate_data) with `overrides`, as `hydra.main` composes
    it; with `hydra_config`, the `hydra` node too."""
    with initialized():
        return hydra_compose(
            config_name, overrides=list(overrides), return_hydra_config=hydra_config
        )


def compose_config(
    config_name: str, overrides: Sequence[str], output_dir: str | Path
) -> DictConfig:
    """The config `scripts/<config_name>.py` would run with these overrides, writing under
    `output_dir` (where `hydra.main` would make a run folder)."""
    cfg = compose(config_name, overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg
