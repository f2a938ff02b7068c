"""Lightning callbacks: a look at where the model's words fall on validation images, a
checkpoint when the job is told to stop, a console without numbers no one can act on, the
training throughput a run reports, and the feature store built before training."""

from __future__ import annotations

import dataclasses
import hashlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table

from captioner.core.errors import Preempted
from captioner.core.images import ImagePreprocess
from captioner.core.inference import Captioner


class ModelSummary(RichModelSummary):
    """Lightning's summary table without its FLOPs column and total, which read 0 unless a
    model is given an example input to trace."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = {name: values for name, values in summary_data if name != "FLOPs"}
        table = Table(header_style="bold magenta")
        for name in columns:
            table.add_column(name or " ", justify="right" if name == "Params" else "left")
        for row in zip(*columns.values(), strict=True):
            table.add_row(*row)
        console = Console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(
            f"{get_human_readable_count(trainable_parameters).strip()} trainable parameters, "
            f"{get_human_readable_count(frozen).strip()} frozen, {model_size:.1f} MB",
            highlight=False,
        )


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar on stderr, and only when stderr is a terminal: piped or
    redirected, a run's output and logs hold no bars. Without `v_num`, the logger's version
    number, which says nothing about training."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(console_kwargs={"stderr": True}, **kwargs)
        if not sys.stderr.isatty():  # not rich's test, which FORCE_COLOR=1 turns on
            self.disable()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def progress_bar(enabled: bool = True) -> Callback:
    """What the configs' `rich_progress_bar` builds: a `ProgressBar`, or, where the trainer is
    told `enable_progress_bar=false`, a callback that does nothing, since Lightning refuses to
    start with that flag beside a progress bar callback."""
    return ProgressBar() if enabled else Callback()


class AttentionSamples(Callback):
    """After each validation, captions the first `num_images` validation images and logs each
    with its per-word image-attention overlays (mean of layers and heads).

    The same images every time, so a run shows attention sharpening as it trains. Figures go
    to TensorBoard when it is a logger (`attention/<i>`, with the caption as text) and, for
    every logger, to `<dirpath>/step_<step>/<i>.png`.
    """

    def __init__(self, dirpath: str | Path, num_images: int = 4) -> None:
        if num_images < 1:
            raise ValueError(
                f"callbacks.attention_samples.num_images must be >= 1, got {num_images}"
            )
        self.dirpath, self.num_images = Path(dirpath), num_images
        self.images: torch.Tensor | None = None  # (N, C, H, W) uint8, as the model saw them

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.images is None and dataloader_idx == 0 and len(batch["images"]):
            preprocess = ImagePreprocess.from_dict(pl_module.preprocess)
            self.images = preprocess.denormalize(batch["images"][: self.num_images].cpu())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.images is None:
            return
        from captioner.viz import save_figure, word_overlays

        captioner = Captioner(
            pl_module.net,
            pl_module.tokenizer,
            ImagePreprocess.from_dict(pl_module.preprocess),
            pl_module.device,
        )
        decoding = dataclasses.asdict(pl_module.decoding)
        captions = captioner.caption(self.images, return_attention=True, **decoding)
        step = trainer.global_step
        folder = self.dirpath / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (image, caption) in enumerate(zip(self.images, captions, strict=True)):
            figure = word_overlays(
                image.permute(1, 2, 0).numpy(), caption.image_attention, caption.words
            )
            save_figure(figure, folder / f"{i}.png", dpi=80)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"attention/{i}", figure, step)
                    logger.experiment.add_text(f"attention/{i}", caption.text, step)


class CheckpointOnSigterm(Callback):
    """On SIGTERM (what SLURM and other schedulers send before pre-empting a job), write
    `last.ckpt` at the end of the training step under way, then stop with `Preempted` (exit
    status 143), so a pre-emption costs at most one step, never the steps since the last
    periodic checkpoint.

    The checkpoint is written where the step-interval one is, so resuming from it
    (`ckpt_path=last`) is exact. A SIGTERM during validation lets validation finish first;
    one after the last step leaves the final checkpoints as they are. Under DDP, processes
    agree after every step on whether any of them was told to stop, as Lightning's own
    handler does. The handler replaces Lightning's while training runs (which would stop
    mid-validation, or end the process with status 0) and is put back at the end.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.requested = False
        self._previous: Any = None
        self._trainer: Trainer | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may handle signals; Lightning's handler stays
        self.requested, self._trainer = False, trainer
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if not self.requested and launcher is not None:
            launcher.kill(signum)  # the processes this one started get it too
        self.requested = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        stop = self.requested
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.save_checkpoint(self.path)
            raise Preempted(
                f"stopped by SIGTERM after step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}); saved {self.path}. Resume with ckpt_path=last "
                f"hydra.run.dir={self.path.parent.parent}"
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()
        if self.requested:
            raise Preempted(
                "stopped by SIGTERM after the last training step; the final checkpoints are "
                "written, the test was not run: python scripts/eval.py ckpt_path=<checkpoint>"
            )

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class StepTimer(Callback):
    """Images and seconds spent in training steps (forward, backward, optimizer; not loading,
    not validation), over every process: the training throughput a run reports."""

    def __init__(self) -> None:
        self.images, self.seconds, self._start = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer: Trainer, module: Any, batch: Any, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, module: Any, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.seconds += time.perf_counter() - self._start
        self.images += len(batch["image_ids"]) * trainer.world_size


class StoredFeatures(Callback):
    """`data.cache_features=true`: when fitting starts, before any loader is built, encode
    every training image once into the data's `FeatureStore` on the device the run trains on
    (rank 0 writes, the other ranks wait), keyed on the encoder's description and a hash of
    its weights, so a store made with other weights or preprocessing is rebuilt, never reused."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net, datamodule = pl_module.net, trainer.datamodule
        device = trainer.strategy.root_device
        encoder = {
            "name": net.config.encoder.label or "vit",
            "config": net.config.without_downloads().to_dict()["encoder"],
            "weights": weights_hash(net.encoder),
        }

        @torch.no_grad()
        def encode(images: torch.Tensor) -> torch.Tensor:
            return net.encode(images.to(device))[0].float().cpu()

        was_training = net.training
        net.encoder.to(device).eval()  # Lightning moves the rest when it sets the model up
        try:
            datamodule.store_features(
                encode, encoder, net.image_tokens, net.encoder.dim, writer=trainer.is_global_zero
            )
        finally:
            net.train(was_training)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's weights and buffers, in name order: any change of value changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
