"""Training a `CaptionerModel` with Lightning: build, step (label shift, loss), optimise.

Validation and test hand their batches to `captioner.training.evaluation.SplitEvaluator`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from captioner.core.checkpoint import checkpoint_record
from captioner.core.errors import CheckpointError, ConfigError, DataError, TrainingError
from captioner.core.generation import DecodingOptions
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.core.seeding import mix_seed
from captioner.core.values import is_int, short
from captioner.metrics import box_coverage, grounding_loss
from captioner.training.evaluation import SplitEvaluator, TokenizerLike
from captioner.training.loss import linear_cross_entropy
from captioner.training.scst import (
    CaptionReward,
    SelfCritical,
    self_critical_loss,
    training_document_frequency,
)

log = logging.getLogger(__name__)


def warmup_cosine_schedule(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.05
) -> LambdaLR:
    """Linear warm-up to the base learning rate, then cosine decay to `min_lr_ratio` of it.

    A warm-up longer than a quarter of the run would leave it at a fraction of its learning
    rate and never decay (a 30-step run with 200 warm-up steps learns one caption for every
    image): it is cut to a tenth of the run, and the log says so.
    """
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(
            "model.scheduler needs warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, "
            f"got {warmup_steps} and {min_lr_ratio}."
        )
    if warmup_steps > total_steps / 4:
        shorter = max(1, total_steps // 10)
        if rank_zero_only.rank == 0:
            log.warning(
                "model.scheduler.warmup_steps=%d is over a quarter of this run's %d steps: "
                "warming up over %d instead",
                warmup_steps, total_steps, shorter,
            )  # fmt: skip
        warmup_steps = shorter

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def teacher_forced_loss(
    net: CaptionerModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    pad_id: int,
    label_smoothing: float = 0.0,
    need_weights: bool = False,
    memory: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Next-word loss of captions `tokens` (B, T), <bos> first: the decoder reads
    tokens[:, :-1] and is scored on tokens[:, 1:], padding ignored. Returns the mean loss and,
    with `need_weights`, the image attention per layer (B, heads, T - 1, S). `memory`: the
    image tokens, already encoded (a feature store), instead of `images`.

    The output projection and the loss are fused (`linear_cross_entropy`): the logits are
    never stored, and padded positions are never projected.
    """
    states = net.features(images, tokens[:, :-1], need_weights=need_weights, memory=memory)
    loss = linear_cross_entropy(
        states.hidden, net.output_weight, tokens[:, 1:], pad_id, label_smoothing
    )
    return loss, states.image_attention


# Below this many nats per token of `val/image_gain` the decoder is taken to ignore the image
# (a trained shapes model gains over 1; a decoder reading zeros gains 0).
BLIND_GAIN = 0.05

# Keys under `model.encoder` that say how to train it, not what it is: never in checkpoints.
ENCODER_TRAINING = ("freeze", "lr_scale", "layer_decay")


def _inputs(batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(images, None), or (None, image tokens) for a batch read from a feature store."""
    if "features" in batch:
        return None, batch["features"].float()
    return batch["images"], None


def parameter_groups(
    net: CaptionerModel, lr: float, encoder_lr_scale: float = 1.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer groups: no weight decay on vectors (biases, norms) nor on the encoder's
    positions and learned tokens (`ImageEncoder.no_weight_decay`); the encoder's learning rate
    times `encoder_lr_scale`, and times `layer_decay` once more per block below its last
    (`ImageEncoder.layer_ids`: the embeddings are the deepest down), the usual recipe for
    fine-tuning a pretrained ViT. Frozen parameters are in no group."""
    encoder = net.encoder
    depth = len(encoder.stages())
    ids, keep = encoder.layer_ids(), encoder.no_weight_decay()
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        scale, decay = 1.0, param.ndim >= 2 and not name.endswith("pos_embed")
        if name.startswith("encoder."):
            inner = name.removeprefix("encoder.")
            scale = encoder_lr_scale * layer_decay ** (depth + 1 - min(ids[inner], depth + 1))
            decay = decay and inner not in keep
        groups.setdefault((decay, scale), []).append(param)
    return [
        {"params": params, "lr": lr * scale, **({} if decay else {"weight_decay": 0.0})}
        for (decay, scale), params in groups.items()
    ]


class CaptionerLitModule(LightningModule):
    """Teacher-forced training; validation and test decode and score the captions
    (`SplitEvaluator`).

    The architecture (`model.max_len`, `model.dropout`, `model.encoder`, `model.decoder`)
    arrives as keyword arguments and becomes a `CaptionerConfig`; the encoder's training keys
    (`ENCODER_TRAINING`: how much of it to freeze, its learning-rate scale and layer-wise
    decay) are taken out first. Every checkpoint also keeps the tokenizer, the image
    preprocessing (`ImagePreprocess.to_dict()`; `tasks.train` gives it the mean, std and
    interpolation of a pretrained encoder's weights) and the data config (`data_config`), so
    one file rebuilds the captioner and finds its test set. `decoding` holds `DecodingOptions`
    fields for validation and test (greedy by default); `spice` adds SPICE to test metrics.
    `attention_supervision` weighs `grounding_loss` against the caption loss, on data that knows
    which object each word names (shapes); on such data, validation and test also score
    grounding (`<split>/grounding/...`). `compile` runs the training loss (forward and
    backward) through `torch.compile`: a GPU speed-up; on CPUs the step is matmul-bound and
    the first step's compilation costs more than it saves. `scst` (`SelfCritical` keys) trains
    on CIDEr-D rewards of the model's own captions instead of cross-entropy: self-critical
    training, usually started from a cross-entropy checkpoint. `nonfinite` says what a NaN or
    infinite loss or gradient does: `stop` raises `TrainingError` naming the step and the
    batch (no checkpoint is written after it), `skip` logs it and leaves the weights as they
    were.

    Under DDP each process decodes its share of a split; at the end of the epoch the metrics
    are the same on every rank, and `predictions` (every image's caption) are on rank 0.
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
        compile: bool = False,
        nonfinite: str = "stop",
        scst: dict[str, Any] | None = None,
        **architecture: Any,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if nonfinite not in ("stop", "skip"):
            raise ConfigError(f"model.nonfinite must be stop or skip, got {nonfinite!r}.")
        if not attention_supervision >= 0.0:
            raise ConfigError(
                f"model.attention_supervision must be >= 0, got {attention_supervision}."
            )
        self.save_hyperparameters(
            ignore=["tokenizer", "preprocess", "optimizer", "scheduler"],
            logger=False,
        )
        encoder = dict(architecture.get("encoder") or {})
        training = {key: encoder.pop(key) for key in ENCODER_TRAINING if key in encoder}
        self.encoder_lr_scale = float(training.get("lr_scale", 1.0))
        self.encoder_layer_decay = float(training.get("layer_decay", 1.0))
        if not (self.encoder_lr_scale >= 0.0 and 0.0 < self.encoder_layer_decay <= 1.0):
            raise ConfigError(
                "model.encoder.lr_scale must be >= 0 and model.encoder.layer_decay in (0, 1], "
                f"got {training.get('lr_scale')} and {training.get('layer_decay')}."
            )
        architecture = {**architecture, "encoder": encoder} if encoder else architecture
        self.config = CaptionerConfig.from_dict({**architecture, "vocab_size": len(tokenizer)})
        self.net = CaptionerModel(self.config)
        self.net.encoder.freeze(training.get("freeze", "none"))
        self.tokenizer, self.preprocess = tokenizer, preprocess
        # The data config it is trained on, kept in checkpoints so evaluation finds the test
        # split; set by `tasks.train` (a dict with `_target_` cannot pass through instantiate).
        self.data_config: dict[str, Any] | None = None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        if optimizer is not None:  # a value the optimizer refuses is named now, not after setup
            try:
                optimizer(params=[torch.nn.Parameter(torch.zeros(1))])
            except (ValueError, TypeError) as err:
                raise ConfigError(f"model.optimizer: {err}") from None
        self.label_smoothing = label_smoothing
        self.attention_supervision = attention_supervision
        self.nonfinite = nonfinite
        self.self_critical = None if scst is None else SelfCritical.from_config(scst)
        if self.self_critical is not None and attention_supervision:
            raise ConfigError(
                "model.attention_supervision trains attention on reference captions, which "
                "self-critical training (model.scst) does not read: set "
                "model.attention_supervision=0 for it."
            )
        self._reward: CaptionReward | None = None  # made when self-critical training starts
        self._batch_ids: list[Any] = []  # the training batch being stepped, for error messages
        self._epoch_samples = self._epoch_batches = 0  # this epoch's, in this process
        self.run_seed = torch.initial_seed()  # as `seed_everything` left it
        # torch.compile covers the training loss only: decoding's cache grows by one position
        # per step, which would recompile at every step, so evaluation stays eager
        loss = partial(teacher_forced_loss, self.net)
        self._train_loss = torch.compile(loss) if compile else loss
        try:
            self.decoding = DecodingOptions(**(decoding or {}))
        except TypeError as err:
            raise ConfigError(f"unknown decoding key: {err}") from None
        self.decoding.resolve_max_length(self.config)  # fail before training, not after
        self.evaluator = SplitEvaluator(
            self.net, tokenizer, self.decoding, label_smoothing=label_smoothing, spice=spice
        )
        # split -> {image id: caption}, kept after each validation or test epoch (on rank 0)
        self.predictions: dict[str, dict[Any, str]] = {}

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-word cross-entropy of the batch's captions (`teacher_forced_loss`)."""
        tokens, pad_id = batch["tokens"], self.tokenizer.pad_id
        images, memory = _inputs(batch)
        return self._train_loss(images, tokens, pad_id, self.label_smoothing, memory=memory)[0]

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
        images, memory = _inputs(batch)
        loss, image_attention = self._train_loss(
            images, batch["tokens"], self.tokenizer.pad_id, self.label_smoothing,
            need_weights=True, memory=memory,
        )  # fmt: skip
        assert image_attention is not None
        encoder = self.net.encoder
        coverage, _ = box_coverage(
            batch["word_boxes"][:, 1:], encoder.grid_size, encoder.patch_size
        )  # (B, T - 1, grid_h, grid_w)
        patches = [layer[..., self.net.image_prefix_tokens :] for layer in image_attention]
        return loss, grounding_loss(patches, coverage.flatten(2))

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Dropout's random numbers for this batch from (seed, rank, epoch, batch) alone: a
        run resumed from any checkpoint drops what the uninterrupted run dropped."""
        epoch, rank = self.current_epoch, self.global_rank
        torch.manual_seed(mix_seed(self.run_seed, rank, epoch, batch_idx))

    def on_train_epoch_start(self) -> None:
        self._epoch_samples = self._epoch_batches = 0

    def on_fit_start(self) -> None:
        """Self-critical rewards need CIDEr-D statistics of the training references: read or
        built here, once per run, from the data module's training split."""
        if self.self_critical is None or self._reward is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ConfigError(
                "self-critical training (model.scst) rewards CIDEr-D against the training "
                "references, which it reads from a data module: fit with datamodule=..."
            )
        document_frequency = training_document_frequency(
            datamodule.training_references(), datamodule.training_cache_file("cider-df")
        )
        self._reward = CaptionReward(document_frequency, self.self_critical.length)

    def self_critical_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's self-critical loss (`captioner.training.scst`); its reward, baseline,
        |advantage|, caption length and entropy go to the log."""
        assert self.self_critical is not None and self._reward is not None
        images, memory = _inputs(batch)
        if memory is None:
            memory, _ = self.net.encode(images)
        loss, stats = self_critical_loss(
            self.net, memory, batch["references"], self.tokenizer, self.self_critical,
            self._reward,
        )  # fmt: skip
        for name, value in stats.items():
            self.log(f"train/{name}", value, prog_bar=name == "reward", batch_size=len(memory))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """After the epoch's last batch, before validation and checkpoints: stop if there was
        nothing to train on (every sample bad and skipped), instead of saving an untrained
        model as if training had happened."""
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._check_trained(self._epoch_samples, "every training sample of epoch {} was "
                                "unusable and skipped")  # fmt: skip

    def on_train_epoch_end(self) -> None:
        """An epoch with no batch at all (a stream read past its end on resuming) stops too."""
        self._check_trained(self._epoch_batches, "epoch {} had no training batch")

    def _check_trained(self, done: int, what: str) -> None:
        count = torch.tensor(done, device=self.device)
        if int(self.trainer.strategy.reduce(count, reduce_op="sum")) == 0:
            raise DataError(
                f"{what.format(self.current_epoch)} (each bad sample is logged above): fix or "
                "replace the data, or point the data config at usable data."
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._epoch_samples += len(batch["image_ids"])
        self._epoch_batches += 1
        if not batch["image_ids"]:  # every sample in it was bad and skipped
            if self.trainer.world_size == 1:
                return None  # no step
            # under DDP every rank must run backward: a zero loss that touches every weight
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        size = len(batch["tokens"])
        if self.self_critical is not None:
            loss = self.self_critical_loss(batch)
        elif not self.attention_supervision:
            loss = self.loss(batch)
        else:
            loss, grounding = self.supervised_loss(batch)
            self.log("train/grounding_loss", grounding, batch_size=size)
            loss = loss + self.attention_supervision * grounding
        self._batch_ids = list(batch["image_ids"])
        if not self._all_ranks(bool(torch.isfinite(loss))):
            return self._nonfinite("loss", batch_idx)
        name = "train/loss" if self.self_critical is None else "train/scst_loss"
        self.log(name, loss, prog_bar=self.self_critical is None, batch_size=size)
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Gradients after backward (and their all-reduce under DDP), before clipping. Under
        fp16 the grad scaler skips non-finite steps itself, so they are left to it."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            self._nonfinite("gradient", None)
            for group in optimizer.param_groups:  # skip: no gradient, so no update at all
                for p in group["params"]:
                    p.grad = None

    def _all_ranks(self, decision: bool) -> bool:
        """True where every DDP process decided True: they must skip the same steps."""
        if self.trainer.world_size == 1:
            return decision
        return self.trainer.strategy.reduce_boolean_decision(decision, all=True)

    def _nonfinite(self, what: str, batch_idx: int | None) -> None:
        """Stop with a message naming the step and the batch, or log and skip the step."""
        trainer = self.trainer
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}"
        where += f", batch {batch_idx})" if batch_idx is not None else ")"
        images = ", ".join(map(str, self._batch_ids[:8])) + (", ..." * (len(self._batch_ids) > 8))
        if self.nonfinite == "stop":
            raise TrainingError(
                f"non-finite {what} at {where}, images {images}. The last checkpoint is the "
                "last good state: lower model.optimizer.lr, check these images, or set "
                "model.nonfinite=skip to skip such steps."
            )
        log.warning("non-finite %s at %s, images %s: step skipped", what, where, images)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.add(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.add(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_scores()

    def on_test_epoch_end(self) -> None:
        self._log_scores()

    def _log_scores(self) -> None:
        metrics, captions = self.evaluator.finish(self.trainer.sanity_checking)
        self.predictions.update(captions)
        for name, value in metrics.items():
            split, key = name.split("/", 1)
            shown = key in ("CIDEr", "scene_acc", "image_gain") or (
                key == "loss" and split == "val"
            )
            self.log(name, value, add_dataloader_idx=False, prog_bar=shown)
        if not self.trainer.sanity_checking and self.trainer.global_step >= self._warmup_steps():
            self._warn_if_blind(metrics, captions.get("val"))

    def _warmup_steps(self) -> int:
        return int(getattr(self.scheduler_factory, "keywords", {}).get("warmup_steps", 0))

    def _warn_if_blind(self, metrics: dict[str, float], captions: dict[Any, str] | None) -> None:
        """One line when, past warm-up, the right image barely helps predict the caption: the
        decoder has learned a language prior and writes the same words whatever it sees."""
        gain = metrics.get("val/image_gain")
        if gain is None or gain >= BLIND_GAIN or rank_zero_only.rank != 0:
            return
        top = ""
        if captions:
            text, count = Counter(captions.values()).most_common(1)[0]
            top = f"; {count / len(captions):.0%} of validation captions are {text!r}"
        log.warning(
            "the decoder is ignoring the image: val/image_gain=%.3f nats per token (the right "
            "image predicts its caption hardly better than another image does)%s. Check that "
            "the images differ and reach the model, train longer or with a higher encoder "
            "learning rate, or add attention supervision where the data has boxes",
            gain, top,
        )  # fmt: skip

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW-style groups (`parameter_groups`): weight decay on matrices only, the
        encoder's learning rate scaled, frozen weights left out."""
        if self.optimizer_factory is None:
            raise ConfigError("model.optimizer is not set: training needs an optimizer config.")
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr", 1e-3)
        groups = parameter_groups(
            self.net, base_lr, self.encoder_lr_scale, self.encoder_layer_decay
        )
        optimizer = self.optimizer_factory(params=groups)
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
        objective = "cross_entropy" if self.self_critical is None else "self_critical"
        checkpoint["captioner"] = checkpoint_record(
            self.config, self.tokenizer.to_dict(), self.preprocess, self.data_config, objective
        )
        checkpoint["run_seed"] = self.run_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run draws dropout from the checkpoint's seed, as its data order does."""
        seed = checkpoint.get("run_seed", self.run_seed)
        if not (is_int(seed) and 0 <= seed < 2**64):
            raise CheckpointError(f"the checkpoint's run_seed {short(seed)} is not a seed.")
        self.run_seed = seed
