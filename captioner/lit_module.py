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
from captioner.generation import DecodingOptions, Generated, generate
from captioner.inference import to_captions
from captioner.metrics import GroundingMeter, box_coverage, caption_scores, grounding_loss
from captioner.models import CaptionerConfig, CaptionerModel


class TokenizerLike(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    itos: list[str]

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
    `attention_supervision` weighs `grounding_loss` against the caption loss, on data that knows
    which object each word names (shapes); on such data, validation and test also score
    grounding (`<split>/grounding/...`).
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        preprocess: dict[str, Any],
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[..., LambdaLR] | None = None,
        label_smoothing: float = 0.0,
        attention_supervision: float = 0.0,
        decoding: dict[str, Any] | None = None,
        spice: bool = False,
        **architecture: Any,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if not attention_supervision >= 0.0:
            raise ConfigError(
                f"model.attention_supervision must be >= 0, got {attention_supervision}."
            )
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
        self.attention_supervision = attention_supervision
        try:
            self.decoding = DecodingOptions(**(decoding or {}))
        except TypeError as err:
            raise ConfigError(f"unknown decoding key: {err}") from None
        self.decoding.resolve_max_length(self.config)  # fail before training, not after
        self.spice = spice
        self._outputs: dict[str, list[tuple[Any, str, list[str], Any]]] = defaultdict(list)
        self._grounding: dict[str, GroundingMeter] = {}
        # split -> {image id: caption}, kept after each validation or test epoch
        self.predictions: dict[str, dict[Any, str]] = {}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-word cross-entropy: inputs are tokens[:-1], targets tokens[1:]; pads ignored."""
        return self._caption_loss(self.net(batch["images"], batch["tokens"][:, :-1]), batch)

    def _caption_loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            batch["tokens"][:, 1:].flatten(),
            ignore_index=self.tokenizer.pad_id,
            label_smoothing=self.label_smoothing,
        )

    def supervised_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption loss and grounding loss, from one pass through the explicit attention path.

        The query at input position t predicts token t + 1, so its target is the box of the
        object token t + 1 names.
        """
        if "word_boxes" not in batch:
            raise ConfigError(
                "model.attention_supervision needs to know which object each word names, which "
                "only data=shapes provides: set model.attention_supervision=0 for this data."
            )
        memory, _ = self.net.encoder(batch["images"])
        out = self.net.decoder(batch["tokens"][:, :-1], memory, need_weights=True)
        assert out.cross_attention is not None
        prefix = self.net.encoder.num_prefix_tokens
        coverage, _ = box_coverage(
            batch["word_boxes"][:, 1:], self.config.grid_size, self.config.patch_size
        )  # (B, T - 1, grid_h, grid_w)
        cross = [layer[..., prefix:] for layer in out.cross_attention]
        return self._caption_loss(out.logits, batch), grounding_loss(cross, coverage.flatten(2))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not batch["image_ids"]:  # every sample in it was bad and skipped
            if self.trainer.world_size == 1:
                return None  # no step
            # under DDP every rank must run backward: a zero loss that touches every weight
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        size = len(batch["tokens"])
        if not self.attention_supervision:
            loss = self.loss(batch)
        else:
            loss, grounding = self.supervised_loss(batch)
            self.log("train/grounding_loss", grounding, batch_size=size)
            loss = loss + self.attention_supervision * grounding
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def generate(self, images: torch.Tensor, need_weights: bool = False) -> Generated:
        """Captions for a batch of normalised images, decoded with `self.decoding`."""
        tok = self.tokenizer
        return generate(
            self.net, images, tok.bos_id, tok.eos_id, tok.pad_id, self.decoding,
            need_weights=need_weights,
        )  # fmt: skip

    def _eval_step(self, batch: dict[str, Any]) -> None:
        if not batch["image_ids"]:  # every sample in it was bad and skipped
            return
        split = batch["split"]
        self.log(
            f"{split}/loss", self.loss(batch), batch_size=len(batch["tokens"]),
            add_dataloader_idx=False, prog_bar=split == "val",
        )  # fmt: skip
        scenes = batch.get("scenes")
        out = self.generate(batch["images"], need_weights=scenes is not None)
        if scenes is not None:
            self._score_grounding(split, out, list(scenes))
        rows = zip(
            batch["image_ids"],
            [self.tokenizer.decode(row.tolist()) for row in out.tokens],
            batch["references"],
            scenes or [None] * len(batch["image_ids"]),
            strict=True,
        )
        self._outputs[split].extend(rows)

    def _score_grounding(self, split: str, out: Generated, scenes: list[Any]) -> None:
        """Adds each generated caption's word -> object looks to the split's grounding meter."""
        meter = self._grounding.setdefault(split, GroundingMeter(self.config.patch_size))
        for scene, caption in zip(
            scenes, to_captions(out, self.tokenizer, self.net.encoder), strict=True
        ):
            words = [w for w in caption.words if w != "<eos>"]
            assert caption.cross_attention is not None
            boxes = [obj.box for obj in scene.objects]
            meter.update(caption.cross_attention, scene.align(words), boxes)

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
            if split in self._grounding:
                metrics.update(self._grounding.pop(split).compute())
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
