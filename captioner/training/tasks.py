"""`train(cfg)`, `evaluate(cfg)` and `validate_data(cfg)`: the glue from a composed Hydra config
to results, what the scripts and the notebooks call."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from torch.utils.data import DataLoader

from captioner.core.checkpoint import CheckpointContents, load_checkpoint, record_data_config
from captioner.core.errors import ConfigError, Preempted
from captioner.core.files import write_text
from captioner.core.images import ImagePreprocess
from captioner.core.tokenizer import Tokenizer, split_words
from captioner.core.values import is_int, short
from captioner.data.policy import BAD, BadSample
from captioner.data.stored import recorded_datamodule
from captioner.metrics import warn_if_no_java
from captioner.metrics.coco import has_java, tokenizer_name
from captioner.training.build import instantiate, instantiate_group
from captioner.training.callbacks import StepTimer, StoredFeatures
from captioner.training.card import evaluation_card
from captioner.training.checkpoint_io import remove_stale_temporaries
from captioner.training.lit_module import CaptionerLitModule
from captioner.training.quiet import quiet_lightning
from captioner.training.resume import (
    TrainingStarted,
    check_run_folders,
    checkpoint_folders,
    restore_errors,
    starting_point,
    written_checkpoint,
)

log = logging.getLogger(__name__)


def _check_processes_can_start(trainer: L.Trainer) -> None:
    """Lightning starts the other DDP processes by re-running the command line, which under a
    `-m` sweep would start a sweep of its own in each of them."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None or environment.creates_processes_externally:
        return  # one process per device already (SLURM, torchrun), or a single device
    if trainer.num_devices * trainer.num_nodes == 1:
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            "a -m sweep cannot start the DDP processes itself: use hydra/launcher=slurm, which "
            "starts one task per device, or run each setting without -m."
        )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit on the training split, then test the best checkpoint; returns (metrics, objects).

    The metrics are flat (`test/scene_acc`, `test/CIDEr`, ...) and are also written to
    `${paths.output_dir}/metrics.json`. Under DDP every process runs this and returns the
    same metrics; rank 0 alone writes the files.
    """
    seed = cfg.get("seed")
    if seed is not None and not is_int(seed):
        raise ConfigError(f"seed={short(seed)}: must be an integer, or null for no seeding.")
    if cfg.get("test", True):
        warn_if_no_java()
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not cfg.get("logger"):  # the learning rate has nowhere to go: not an error
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    folders = checkpoint_folders(callbacks)
    start = starting_point(cfg, folders)  # every checkpoint named is read before anything runs
    if cfg.get("train", True):
        check_run_folders(folders, start.ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    with quiet_lightning():
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False
        )
    _check_processes_can_start(trainer)
    if start.source is not None:  # the vocabulary it was trained with, never one rebuilt
        datamodule.tokenizer = Tokenizer.from_dict(start.source.tokenizer)
    model = instantiate(
        cfg.model, tokenizer=datamodule.tokenizer, preprocess=datamodule.preprocess.to_dict()
    )
    backbone = model.net.encoder.preprocessing()  # the pixels its weights were trained on
    if backbone is not None:
        model.preprocess = ImagePreprocess.from_dict({**model.preprocess, **backbone}).to_dict()
        datamodule.use_preprocess(ImagePreprocess.from_dict(model.preprocess))
    if getattr(datamodule, "cache_features", False):
        if any(p.requires_grad for p in model.net.encoder.parameters()):
            raise ConfigError(
                "data.cache_features=true stores the encoder's outputs once, so the encoder "
                "must not change: set model.encoder.freeze=all (or data.cache_features=false)."
            )
        trainer.callbacks.append(StoredFeatures())
    start.prepare(model.net, model.config)
    model.data_config = record_data_config(OmegaConf.to_container(cfg.data, resolve=True))
    num_params = model.net.num_parameters()
    for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
        logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "num_params": num_params}
        )
    if rank_zero_only.rank == 0:
        log.info("model: %s parameters", f"{num_params:,}")

    fit_seconds, steps = 0.0, StepTimer()
    if cfg.get("train", True):
        if trainer.is_global_zero:
            for folder in folders:
                for stale in remove_stale_temporaries(folder):
                    log.warning("removed %s, left by a checkpoint write that was killed", stale)
        began = time.perf_counter()
        started = TrainingStarted()
        trainer.callbacks.extend([started, steps])
        with (
            _sigterm_reported("before the first training step; nothing was saved"),
            restore_errors(start.ckpt_path, started),
            quiet_lightning(),
        ):
            trainer.fit(model, datamodule=datamodule, ckpt_path=start.ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - began
    # the last validation (image gain, diversity, ...) goes in metrics.json beside the test
    validated = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    metrics: dict[str, float] = {}
    if cfg.get("test", True) and not datamodule.test_splits():
        log.warning("the data has no test split: skipping the test (set one, e.g. data.test_json)")
    elif cfg.get("test", True):
        ckpt = start.ckpt_path  # without training, test the checkpoint that was given
        if cfg.get("train", True):
            callback = trainer.checkpoint_callback
            ckpt = callback.best_model_path if callback else ""
            if not ckpt:
                log.warning("no best checkpoint (fast_dev_run or no validation): testing as is")
            elif Path(ckpt).resolve().parent not in {f.resolve() for f in folders}:
                # Lightning restores the best path a resumed checkpoint records, wherever it is
                log.warning(
                    "the best checkpoint recorded, %s, is not this run's: testing as is", ckpt
                )
                ckpt = ""
        with _sigterm_reported("while testing; training had finished"), quiet_lightning():
            trainer.test(
                model, datamodule=datamodule, ckpt_path=ckpt or None, verbose=False,
                weights_only=True,
            )  # fmt: skip
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    metrics.update(validated)
    metrics["train/seconds"] = round(fit_seconds, 1)
    metrics["train/steps"] = float(trainer.global_step)
    metrics["model/params"] = float(num_params)
    if steps.seconds:  # zero unless this call trained
        metrics["train/images_per_s"] = round(steps.images / steps.seconds, 2)
    metrics.update(_data_metrics(datamodule, trainer))

    metrics_path = _write_json(cfg, "metrics.json", dict(sorted(metrics.items())), trainer)
    objects = {
        "cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer,
        "metrics_path": metrics_path, "checkpoint": written_checkpoint(trainer, folders),
    }  # fmt: skip
    return metrics, objects


@contextmanager
def _sigterm_reported(when: str) -> Iterator[None]:
    """Lightning ends a SIGTERMed process with status 0: report it as `Preempted` instead."""
    try:
        yield
    except SIGTERMException:
        raise Preempted(f"stopped by SIGTERM {when}.") from None


def _data_metrics(datamodule: Any, trainer: L.Trainer) -> dict[str, float]:
    """How many bad samples were skipped, when skipping is allowed: never a silent loss.

    Each process met only the samples of its own share: the count covers all of them.
    """
    if datamodule.bad_samples.policy != "skip":
        return {}
    skipped = set(datamodule.bad_samples.skipped)
    if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
        shares: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(shares, skipped)
        skipped = set().union(*shares)
    if trainer.is_global_zero:
        log.info("skipped %d bad samples, each logged above", len(skipped))
    return {"data/skipped_samples": float(len(skipped))}


def _write_json(cfg: DictConfig, name: str, value: Any, trainer: L.Trainer | None = None) -> Path:
    """Write `value` under this run's output folder (on rank 0 only); returns the path."""
    output_dir = Path(cfg.paths.output_dir)
    path = output_dir / name
    if trainer is None or trainer.is_global_zero:
        write_text(path, json.dumps(value, indent=2) + "\n")
    return path


def _data_changes(cfg: DictConfig) -> dict[str, Any] | None:
    """None for a `data=...` of the command line; else the keys (`+data.key=...`) that change
    the data config the checkpoint records."""
    if cfg.get("data") is None:
        return {}
    return None if "_target_" in cfg.data else OmegaConf.to_container(cfg.data, resolve=True)


def _eval_datamodule(cfg: DictConfig, contents: CheckpointContents) -> Any:
    """`data=...` from the command line when given, else the data the checkpoint was trained
    on, rebuilt from its record, never instantiated from it; image size and caption length
    always follow the model."""
    model = {"image_size": list(contents.config.image_size), "max_len": contents.config.max_len}
    changes = _data_changes(cfg)
    if changes is not None:
        return recorded_datamodule(contents, **changes, **model)
    with open_dict(cfg):  # in place, so interpolations (${paths.root_dir}) still resolve
        cfg.data.merge_with(model)
    return instantiate(cfg.data)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Caption every test split of a checkpoint's data and score it as papers do.

    Writes `predictions.json` (COCO results format, `predictions_<split>.json` for further
    test splits) and `metrics.json` under `${paths.output_dir}`; returns (metrics, objects).
    """
    try:
        ckpt_path = cfg.ckpt_path
    except MissingMandatoryValue:
        raise ConfigError(
            "a checkpoint is required: python scripts/eval.py --ckpt PATH (a .ckpt from "
            "scripts/train.py, its run folder, or a folder from scripts/export.py)."
        ) from None
    warn_if_no_java()
    contents = load_checkpoint(ckpt_path)
    datamodule = _eval_datamodule(cfg, contents)
    tokenizer = Tokenizer.from_dict(contents.tokenizer)
    datamodule.tokenizer = tokenizer  # the vocabulary the model was trained with
    datamodule.use_preprocess(ImagePreprocess.from_dict(contents.preprocess))
    if not datamodule.test_splits():
        raise ConfigError(
            "the data has no test split to evaluate on: name one (data.test_json, data.test_file, "
            "data.test_list or data.test_shards), e.g. the validation file."
        )
    architecture = {k: v for k, v in contents.config.to_dict().items() if k != "vocab_size"}
    model = CaptionerLitModule(
        tokenizer,
        contents.preprocess,
        decoding=OmegaConf.to_container(cfg.decoding, resolve=True),
        spice=cfg.spice,
        **architecture,
    )
    contents.load_into(model.net)
    model.data_config = contents.data
    with quiet_lightning():
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=False
        )
    with _sigterm_reported("while evaluating"), quiet_lightning():
        trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    metrics.update(_data_metrics(datamodule, trainer))
    prediction_paths = {}
    for split, captions in model.predictions.items():  # every image, on rank 0 only
        name = "predictions.json" if split == "test" else f"predictions_{split}.json"
        ordered = sorted(captions, key=lambda k: (isinstance(k, str), k))  # ints, then names
        results = [{"image_id": k, "caption": captions[k]} for k in ordered]
        prediction_paths[split] = _write_json(cfg, name, results, trainer)
    metrics_path = _write_json(cfg, "metrics.json", dict(sorted(metrics.items())), trainer)
    changes = _data_changes(cfg)
    card = evaluation_card(
        contents.source, contents.kind,
        OmegaConf.to_container(cfg.data, resolve=True) if changes is None
        else {**(contents.data or {}), **changes},
        {split: len(captions) for split, captions in model.predictions.items()},
        dataclasses.asdict(model.decoding), tokenizer_name(fast=False), has_java(),
    )  # fmt: skip
    objects = {
        "cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer,
        "metrics_path": metrics_path, "prediction_paths": prediction_paths,
        "card_path": _write_json(cfg, "eval_card.json", card, trainer),
    }  # fmt: skip
    return metrics, objects


def validate_data(cfg: DictConfig) -> tuple[dict[str, Any], Path]:
    """Read every entry of every split of `cfg.data` and collect the bad ones, whatever
    `data.on_bad_sample` says; returns (report, path of report.json)."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    if "on_bad_sample" in node:
        node.on_bad_sample = "skip"  # collect every bad entry instead of stopping at the first
    datamodule = instantiate(node)
    datamodule.bad_samples.quiet = True  # listed in the report, not logged as skipped
    splits: dict[str, dict[str, int]] = {}
    bad: list[BadSample] = []
    for split in datamodule.split_names():
        dropped = len(datamodule.bad_samples.skipped)
        dataset = datamodule.dataset(split, scan=True)
        loader = DataLoader(
            dataset, batch_size=64, num_workers=datamodule.num_workers, collate_fn=list
        )
        # entries dropped while reading the split's annotation file count as its bad ones
        dropped = len(datamodule.bad_samples.skipped) - dropped
        counts = splits.setdefault(split, {"samples": 0, "bad": dropped, "long_captions": 0})
        ids: dict[Any, str] = {}  # image id -> where it was first seen
        for samples in loader:
            for sample in samples:
                counts["samples"] += 1
                if BAD not in sample:
                    first = ids.setdefault(sample["image_id"], sample["source"])
                    if first != sample["source"]:
                        reason = f"image id {sample['image_id']!r} is also the id of {first}"
                        sample[BAD] = BadSample(sample["source"], reason)
                if BAD in sample:
                    counts["bad"] += 1
                    bad.append(sample[BAD])
                    continue
                lengths = (len(split_words(c)) + 2 for c in sample["captions"])  # <bos>, <eos>
                counts["long_captions"] += sum(n > datamodule.max_len for n in lengths)
    # entries dropped while reading the annotation files come first, as the files list them
    dropped = [BadSample(s, r) for s, r in datamodule.bad_samples.skipped.items()]
    report = {"splits": splits, "bad": [b._asdict() for b in dropped + bad]}
    return report, _write_json(cfg, "report.json", report)
