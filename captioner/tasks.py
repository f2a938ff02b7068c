"""`train(cfg)` and `evaluate(cfg)`: the glue from a composed Hydra config to results."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
import traceback
import typing
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from torch.utils.data import DataLoader

from captioner.callbacks import StoredFeatures
from captioner.card import evaluation_card
from captioner.checkpoint import (
    CheckpointContents,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
)
from captioner.data import ImagePreprocess, Tokenizer, split_words
from captioner.data.policy import BAD, BadSample
from captioner.data.stored import record_data_config
from captioner.errors import CheckpointError, ConfigError, DataError, Preempted, TrainingError
from captioner.lit_module import CaptionerLitModule
from captioner.metrics import warn_if_no_java
from captioner.metrics.coco import has_java, tokenizer_name
from captioner.models import CaptionerConfig
from captioner.values import is_int, short

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Single-process loading is the right choice for procedural data on a small CPU.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")  # Lightning internals on new torch
# The datamodule keeps its place in the data in every checkpoint (`CaptionDataModule.state_dict`)
warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")


class _Unactionable(logging.Filter):
    """Lightning's start-up lines that no user of this package can act on."""

    NOISE = ("💡 Tip", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_Unactionable())


def compose_config(
    config_name: str, overrides: Sequence[str], output_dir: str | Path
) -> DictConfig:
    """The config `scripts/<config_name>.py` would run with these overrides, writing under
    `output_dir`: for notebooks and tests, which call `train`/`evaluate` without a Hydra app."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Like `hydra.utils.instantiate`, but a `ConfigError` reaches the user unwrapped, and
    objects receive plain lists and dicts (checkpoints must not pickle OmegaConf objects)."""
    _check_types(node)
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key} is required: add {err.full_key}=... to the command line."
        ) from None
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError | DataError):
            raise err.__cause__ from None
        if isinstance(err.__cause__, ValueError | TypeError):  # the class refused a value
            line = next(iter(str(err.__cause__).splitlines()), "")
            raise ConfigError(f"{_key(node)}: {line}") from None
        raise


def _key(node: DictConfig) -> str:
    return node._get_full_key(None) or "the config"


def _check_types(node: DictConfig) -> None:
    """A value of the wrong kind (`trainer.max_steps=abc`) is named now, with the kind its class
    takes, rather than failing in the middle of a run, or never."""
    try:
        target = get_object(node._target_)
        signature = inspect.signature(target)
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # no `_target_`, or hints that cannot be resolved: nothing to check
        return
    for name in signature.parameters:
        if name not in node or name not in hints or OmegaConf.is_missing(node, name):
            continue
        value = OmegaConf.to_container(node, resolve=True)[name]
        allowed = _allowed(hints[name], value)
        if allowed is not None:
            raise ConfigError(f"{_key(node)}.{name}={short(value)}: must be {allowed}.")


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _allowed(hint: Any, value: Any) -> str | None:
    """None if `value` fits the plain parts of `hint` (bool, int, float, str, None, Literal),
    else what would fit. Hints with other parts (lists, classes) are left to the class."""
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, type(int | None))
        else (hint,)
    )
    literals = [
        v for o in options if typing.get_origin(o) is typing.Literal for v in typing.get_args(o)
    ]
    kinds = [o for o in options if o in _KINDS or o is type(None)]
    if len(kinds) + sum(typing.get_origin(o) is typing.Literal for o in options) < len(options):
        return None
    fits = (
        value in literals
        or (value is None and type(None) in kinds)
        or (isinstance(value, bool) and bool in kinds)
        or (is_int(value) and (int in kinds or float in kinds))
        or (isinstance(value, float) and float in kinds)
        or (isinstance(value, str) and str in kinds)
    )
    if fits:
        return None
    names = [_KINDS[k] for k in kinds if k in _KINDS] + [short(v) for v in literals[:12]]
    return " or ".join(names) + (" or null" if type(None) in kinds else "")


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Callbacks or loggers: every entry of the group that has a `_target_`."""
    if not group:
        return []
    return [_instantiate(node) for node in group.values() if node and "_target_" in node]


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
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not cfg.get("logger"):  # the learning rate has nowhere to go: not an error
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    folders = _checkpoint_folders(callbacks)
    ckpt_path = _resume_from(cfg.get("ckpt_path"), folders)  # checked before anything runs
    resumed = None if ckpt_path is None else _resumable(ckpt_path)
    start = _starting_weights(cfg.get("init_from"))
    if (
        resumed is not None and resumed.objective == "cross_entropy"
        and cfg.model.get("scst") is not None and cfg.get("train", True)
    ):  # fmt: skip
        log.info(
            "%s was trained with cross-entropy: self-critical training starts from its weights "
            "with a new optimizer, schedule and data order (ckpt_path=last resumes this run)",
            ckpt_path,
        )  # fmt: skip
        start, resumed, ckpt_path = resumed, None, None
    if resumed is not None and start is not None:
        log.info("init_from=%s is not used: resuming from %s", cfg.init_from, ckpt_path)
        start = None
    if cfg.get("train", True):
        _check_run_folders(folders, ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.data)
    trainer: L.Trainer = _instantiate(
        cfg.trainer, callbacks=callbacks, logger=_instantiate_group(cfg.get("logger")) or False
    )
    _check_processes_can_start(trainer)
    source = resumed or start
    if source is not None:  # the vocabulary it was trained with, never one rebuilt
        datamodule.tokenizer = Tokenizer.from_dict(source.tokenizer)
    model = _instantiate(
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
    if resumed is not None:
        _check_same_architecture(resumed, model.config, "ckpt_path", "resume with the settings "
                                 "it was trained with, or start a new run")  # fmt: skip
    if start is not None:
        _check_same_architecture(start, model.config, "init_from", "give this run its "
                                 "architecture to start from its weights")  # fmt: skip
        start.load_into(model.net)
        if rank_zero_only.rank == 0:
            log.info("starting from the weights of %s", start.source)
    model.data_config = record_data_config(OmegaConf.to_container(cfg.data, resolve=True))
    num_params = model.net.num_parameters()
    for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
        logger.log_hyperparams(
            {**OmegaConf.to_container(cfg, resolve=True), "num_params": num_params}
        )
    if rank_zero_only.rank == 0:
        log.info("model: %s parameters", f"{num_params:,}")

    fit_seconds, steps = 0.0, _StepTimer()
    if cfg.get("train", True):
        if trainer.is_global_zero:
            for folder in folders:
                for stale in remove_stale_temporaries(folder):
                    log.warning("removed %s, left by a checkpoint write that was killed", stale)
        start = time.perf_counter()
        started = _TrainingStarted()
        trainer.callbacks.extend([started, steps])
        with (
            _sigterm_reported("before the first training step; nothing was saved"),
            _restore_errors(ckpt_path, started),
        ):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - start
    # the last validation (image gain, diversity, ...) goes in metrics.json beside the test
    validated = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    metrics: dict[str, float] = {}
    if cfg.get("test", True) and not datamodule.test_splits():
        log.warning("the data has no test split: skipping the test (set one, e.g. data.test_json)")
    elif cfg.get("test", True):
        ckpt = ckpt_path  # without training, test the checkpoint that was given
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
        with _sigterm_reported("while testing; training had finished"):
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
        "metrics_path": metrics_path, "checkpoint": _written_checkpoint(trainer, folders),
    }  # fmt: skip
    return metrics, objects


def _written_checkpoint(trainer: L.Trainer, folders: list[Path]) -> Path | None:
    """The run's best checkpoint, else its newest `last.ckpt`: what to caption and score with."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        return Path(best)
    found = [folder / "last.ckpt" for folder in folders if (folder / "last.ckpt").is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def _checkpoint_folders(callbacks: list[Any]) -> list[Path]:
    """Where this run's checkpoint callbacks write."""
    dirpaths = {c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath}
    return sorted(map(Path, dirpaths))


def _resume_from(ckpt_path: str | None, folders: list[Path]) -> Path | None:
    """The checkpoint `ckpt_path` names: `last` is the newest `last.ckpt` in this run's
    checkpoint folders, so a run resumes in its own folder."""
    if not ckpt_path:
        return None
    if str(ckpt_path) != "last":
        path, note = resolve_checkpoint(ckpt_path)  # a run folder: its last.ckpt
        if note is not None:
            log.info(note)
        if path.is_dir():
            return path  # an export folder: `_resumable` says why training cannot go on from it
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path}: no such checkpoint file; give the path of a .ckpt or "
                "a run folder, or ckpt_path=last to resume the run in hydra.run.dir."
            )
        return path
    found = [folder / "last.ckpt" for folder in folders if (folder / "last.ckpt").is_file()]
    if not found:
        where = ", ".join(map(str, folders)) or "no checkpoint folder"
        raise ConfigError(
            f"ckpt_path=last: there is no last.ckpt in {where}. To resume a run, run in its "
            "folder: hydra.run.dir=<the run's folder> ckpt_path=last (or ckpt_path=<file>)."
        )
    return max(found, key=lambda path: path.stat().st_mtime)


def _resumable(path: Path) -> CheckpointContents:
    """The checkpoint at `path`, checked to be one training can go on from."""
    contents = load_checkpoint(path)
    if contents.kind != "lightning":
        raise ConfigError(
            f"ckpt_path={path}: an export holds the weights only, not the optimizer, schedule "
            "and data position that train.py needs; give a .ckpt of scripts/train.py "
            "(<run>/checkpoints/last.ckpt), or score the export with scripts/eval.py."
        )
    return contents


def _starting_weights(init_from: str | None) -> CheckpointContents | None:
    """The checkpoint (a .ckpt, a run folder or an export) whose weights a new run starts
    from: fine-tuning, or self-critical training after cross-entropy."""
    if not init_from:
        return None
    path, note = resolve_checkpoint(init_from)
    if note is not None:
        log.info(note)
    if not path.exists():
        raise ConfigError(
            f"init_from={init_from}: no such checkpoint; give the path of a .ckpt, a run folder "
            "or a folder written by scripts/export.py."
        )
    return load_checkpoint(path)


def _check_same_architecture(
    contents: CheckpointContents, config: CaptionerConfig, key: str, fix: str
) -> None:
    """Resuming, or starting from a checkpoint's weights, needs the model the checkpoint was
    trained as (dropout may change): name every key that differs."""
    theirs = _flat(contents.config.to_dict())
    ours = _flat(config.without_downloads().to_dict())  # the weights come from the checkpoint
    changed = [key for key in ours if ours[key] != theirs.get(key) and key != "dropout"]
    if changed:
        names = {k: "data.image_size" if k == "encoder.image_size" else f"model.{k}" for k in ours}
        differences = ", ".join(f"{names[k]}={theirs[k]} (this run: {ours[k]})" for k in changed)
        raise ConfigError(f"{key}={contents.source} was trained with {differences}: {fix}.")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"encoder": {"dim": 64}} -> {"encoder.dim": 64}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_run_folders(folders: list[Path], ckpt_path: Path | None) -> None:
    """Refuse to train over another run's checkpoints: a folder that holds a `last.ckpt` goes
    on only from a checkpoint of its own (`ckpt_path=last`); a new run there would replace it.
    """
    for folder in folders:
        own = ckpt_path is not None and ckpt_path.resolve().parent == folder.resolve()
        if (folder / "last.ckpt").is_file() and not own:
            raise ConfigError(
                f"{folder} already holds the checkpoints of a run (last.ckpt): resume it with "
                "ckpt_path=last, or train in a fresh folder (hydra.run.dir=... or the default, "
                "a new folder per run)."
            )


class _TrainingStarted(Callback):
    """Whether `fit` got past restoring its checkpoint and through one whole training step,
    where the restored optimizer and scheduler states are first used: the next batch, or the
    end of the epoch, comes after it."""

    def __init__(self) -> None:
        self.batches, self.started = 0, False

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.started, self.batches = self.started or self.batches > 0, self.batches + 1

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.started = self.started or self.batches > 0


class _StepTimer(Callback):
    """Images and seconds spent in training steps (forward, backward, optimizer; not loading,
    not validation), over every process: the training throughput a run reports."""

    def __init__(self) -> None:
        self.images, self.seconds, self._start = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch["image_ids"]) * trainer.world_size


@contextmanager
def _restore_errors(ckpt_path: Path | None, progress: _TrainingStarted) -> Iterator[None]:
    """Lightning restores optimizer, loop and callback states from the checkpoint as they are:
    a damaged or forged one fails inside it, or in the first step that uses it. Such a
    failure, before a step has gone through, is named as the checkpoint's (with the error).
    Without a checkpoint, Lightning's own refusal of a setting at start-up (its message names
    the setting and the fix) is a `ConfigError`."""
    try:
        yield
    except (ConfigError, DataError, CheckpointError, TrainingError):
        raise
    except Exception as err:
        line = next(iter(str(err).splitlines()), "").strip()
        if ckpt_path is None and not progress.started and _lightning_refusal(err):
            raise ConfigError(f"the trainer settings: {line}") from None
        if ckpt_path is None or progress.started:
            raise
        raise CheckpointError(
            f"{ckpt_path}: training could not be restored from it ({type(err).__name__}: "
            f"{line[:200]}); the file is damaged, or was written by other code."
        ) from None


def _lightning_refusal(err: Exception) -> bool:
    """A ValueError or MisconfigurationException raised by Lightning's own code."""
    if not isinstance(err, ValueError | MisconfigurationException):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}lightning{os.sep}" in frames[-1].filename


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
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2) + "\n")
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
        return contents.datamodule(**changes, **model)
    with open_dict(cfg):  # in place, so interpolations (${paths.root_dir}) still resolve
        cfg.data.merge_with(model)
    return _instantiate(cfg.data)


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
    trainer: L.Trainer = _instantiate(
        cfg.trainer, callbacks=_instantiate_group(cfg.get("callbacks")), logger=False
    )
    with _sigterm_reported("while evaluating"):
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
    datamodule = _instantiate(node)
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
