"""Training and evaluation of a `CaptionerModel` with Lightning: label shift, loss, metrics."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from captioner.errors import ConfigError
from captioner.generation import DecodingOptions, generate
from captioner.metrics import caption_scores
from captioner.models import CaptionerConfig, CaptionerModel


class TokenizerLike(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int

    def __len__(self) -> int: ...
    def decode(self, ids: Any) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


def warmup_cosine_schedule(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.05
) -> LambdaLR:
    """Linear warm-up to the base learning rate, then cosine decay to `min_lr_ratio` of it."""
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(
            "model.scheduler needs warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, "
            f"got {warmup_steps} and {min_lr_ratio}."
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


class CaptionerLitModule(LightningModule):
    """Teacher-forced training; validation and test decode and score the captions.

    Architecture keys (`model.patch_size`, `model.encoder_dim`, ...) arrive as keyword arguments
    and become a `CaptionerConfig`. Every checkpoint also keeps the tokenizer, the image
    preprocessing (`ImagePreprocess.to_dict()`) and the data config (`data_config`), so one
    file rebuilds the captioner and finds its test set. `decoding` holds `DecodingOptions`
    fields for validation and test (greedy by default); `spice` adds SPICE to test metrics.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        preprocess: dict[str, Any],
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[..., LambdaLR] | None = None,
        label_smoothing: float = 0.0,
        decoding: dict[str, Any] | None = None,
        spice: bool = False,
        **architecture: Any,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.save_hyperparameters(
            ignore=["tokenizer", "preprocess", "optimizer", "scheduler"],
            logger=False,
        )
        self.config = CaptionerConfig.from_dict({**architecture, "vocab_size": len(tokenizer)})
        self.net = CaptionerModel(self.config)
        self.tokenizer, self.preprocess = tokenizer, preprocess
        # The data config it is trained on, kept in checkpoints so evaluation finds the test
        # split; set by `tasks.train` (a dict with `_target_` cannot pass through instantiate).
        self.data_config: dict[str, Any] | None = None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing = label_smoothing
        try:
            self.decoding = DecodingOptions(**(decoding or {}))
        except TypeError as err:
            raise ConfigError(f"unknown decoding key: {err}") from None
        self.decoding.resolve_max_length(self.config)  # fail before training, not after
        self.spice = spice
        self._outputs: dict[str, list[tuple[Any, str, list[str], Any]]] = defaultdict(list)
        # split -> {image id: caption}, kept after each validation or test epoch
        self.predictions: dict[str, dict[Any, str]] = {}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-word cross-entropy: inputs are tokens[:-1], targets tokens[1:]; pads ignored."""
        tokens = batch["tokens"]
        logits = self.net(batch["images"], tokens[:, :-1])  # (B, T-1, vocab)
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            tokens[:, 1:].flatten(),
            ignore_index=self.tokenizer.pad_id,
            label_smoothing=self.label_smoothing,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not batch["image_ids"]:  # every sample in it was bad and skipped
            if self.trainer.world_size == 1:
                return None  # no step
            # under DDP every rank must run backward: a zero loss that touches every weight
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["tokens"]))
        return loss

    def generate(self, images: torch.Tensor) -> list[str]:
        """Captions for a batch of normalised images, decoded with `self.decoding`."""
        tok = self.tokenizer
        out = generate(self.net, images, tok.bos_id, tok.eos_id, tok.pad_id, self.decoding)
        return [tok.decode(row.tolist()) for row in out.tokens]

    def _eval_step(self, batch: dict[str, Any]) -> None:
        if not batch["image_ids"]:  # every sample in it was bad and skipped
            return
        split = batch["split"]
        self.log(
            f"{split}/loss", self.loss(batch), batch_size=len(batch["tokens"]),
            add_dataloader_idx=False, prog_bar=split == "val",
        )  # fmt: skip
        scenes = batch.get("scenes", [None] * len(batch["image_ids"]))
        rows = zip(
            batch["image_ids"],
            self.generate(batch["images"]),
            batch["references"],
            scenes,
            strict=True,
        )
        self._outputs[split].extend(rows)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def _eval_epoch_end(self) -> None:
        for split, rows in self._outputs.items():
            predictions = {image_id: caption for image_id, caption, _, _ in rows}
            references = {image_id: refs for image_id, _, refs, _ in rows}
            is_test = split.startswith("test")  # METEOR's Java start-up is kept out of val
            metrics = caption_scores(
                predictions, references, meteor=is_test, spice=is_test and self.spice
            )
            if rows[0][3] is not None:  # ground truth known: is every caption fully correct?
                correct = [scene.caption_is_correct(caption) for _, caption, _, scene in rows]
                metrics["scene_acc"] = sum(correct) / len(correct)
            for name, value in metrics.items():
                self.log(
                    f"{split}/{name}",
                    value,
                    add_dataloader_idx=False,
                    prog_bar=name in ("CIDEr", "scene_acc"),
                )
            self.predictions[split] = predictions
        self._outputs.clear()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end()

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW-style groups: weight decay on matrices only, not on biases, norms or positions."""
        decay, no_decay = [], []
        for name, param in self.net.named_parameters():
            (decay if param.ndim >= 2 and not name.endswith("pos_embed") else no_decay).append(
                param
            )
        if self.optimizer_factory is None:
            raise ConfigError("model.optimizer is not set: training needs an optimizer config.")
        optimizer = self.optimizer_factory(
            params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        )
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):  # a stream with no length and no step limit
            raise ConfigError(
                "the learning-rate schedule needs the number of training steps, which a stream "
                "of shards does not know: set trainer.max_steps or data.epoch_samples."
            )
        total = int(total)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Everything needed to rebuild the model without Hydra, as plain types."""
        checkpoint["captioner"] = {
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "preprocess": self.preprocess,
            "data": self.data_config,
        }
