"""`train(cfg)`: the glue from a composed Hydra config to a trained, tested model."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from captioner.errors import ConfigError

log = logging.getLogger(__name__)

# Single-process loading is the right choice for procedural data on a small CPU.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")  # Lightning internals on new torch


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Like `hydra.utils.instantiate`, but a `ConfigError` reaches the user unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Callbacks or loggers: every entry of the group that has a `_target_`."""
    if not group:
        return []
    return [_instantiate(node) for node in group.values() if node and "_target_" in node]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit on the training split, then test the best checkpoint; returns (metrics, objects).

    The metrics are flat (`test/scene_acc`, `test/CIDEr`, ...) and are also written to
    `${paths.output_dir}/metrics.json`.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.data)
    model = _instantiate(cfg.model, tokenizer=datamodule.tokenizer)
    trainer: L.Trainer = _instantiate(
        cfg.trainer,
        callbacks=_instantiate_group(cfg.get("callbacks")),
        logger=_instantiate_group(cfg.get("logger")) or False,
    )
    num_params = model.net.num_parameters()
    for logger in trainer.loggers:
        logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "num_params": num_params}
        )
    log.info("model: %s parameters", f"{num_params:,}")

    fit_seconds = 0.0
    if cfg.get("train", True):
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_seconds = time.perf_counter() - start

    metrics: dict[str, float] = {}
    if cfg.get("test", True):
        ckpt = cfg.get("ckpt_path")  # without training, test the checkpoint that was given
        if cfg.get("train", True):
            callback = trainer.checkpoint_callback
            ckpt = callback.best_model_path if callback else ""
            if not ckpt:
                log.warning("no best checkpoint (fast_dev_run or no validation): testing as is")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    metrics["train/seconds"] = round(fit_seconds, 1)

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.json"
    metrics_path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    objects = {
        "cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer,
        "metrics_path": metrics_path,
    }  # fmt: skip
    return metrics, objects
