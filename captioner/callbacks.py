"""Lightning callbacks: a look at where the model's words fall on validation images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from captioner.data.transforms import ImagePreprocess
from captioner.inference import Captioner


class AttentionSamples(Callback):
    """After each validation, captions the first `num_images` validation images and logs each
    with its per-word cross-attention overlays (mean of layers and heads).

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
        from captioner.viz import word_overlays

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
                image.permute(1, 2, 0).numpy(), caption.cross_attention, caption.words
            )
            figure.savefig(folder / f"{i}.png", dpi=80)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"attention/{i}", figure, step)
                    logger.experiment.add_text(f"attention/{i}", caption.text, step)
