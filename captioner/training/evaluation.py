"""Scoring validation and test splits: decode every image, score the captions as papers do,
and gather the processes' shares under DDP, so every image counts exactly once.

`SplitEvaluator` is what the LightningModule hands its validation and test batches to: each
process keeps one `EvalRow` per image it decoded; at the end of the epoch rank 0 gathers every
row, keeps each image once, scores each split (pycocoevalcap's Java runs there only) and
broadcasts the metrics, so every rank logs, checkpoints and stops on the same numbers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from captioner.core.errors import DataError
from captioner.core.generation import DecodingOptions, Generated, generate
from captioner.core.inference import to_captions
from captioner.core.models import CaptionerModel
from captioner.core.models.blocks import Reading
from captioner.metrics import GroundingMeter, caption_scores


class TokenizerLike(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    itos: list[str]

    def __len__(self) -> int: ...
    def decode(self, ids: Any) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


class EvalRow(NamedTuple):
    """One scored image: what each process keeps, and rank 0 gathers, to score a split."""

    image_id: Any
    source: str  # the file or shard entry it was read from
    caption: str  # generated
    references: list[str]
    loss: float  # summed cross-entropy of its target tokens (reference 0, teacher-forced)
    tokens: int  # how many target tokens that sum covers
    shuffled_loss: float | None  # the same with another image of its batch (None: alone in it)
    blank_loss: float  # the same with a blank image (every pixel the dataset mean)
    image_share: tuple[float, ...] | None  # per layer, the attention mass words put on the image
    scene: Any  # the ground truth, on data that has it (shapes), else None
    grounding: GroundingMeter | None  # this caption's word -> object looks, with a scene


class SplitEvaluator:
    """This process's rows of every split evaluated in an epoch, and their scores.

    `label_smoothing` is the training loss's, so the validation loss is comparable to it;
    `spice` adds SPICE to the test metrics.
    """

    def __init__(
        self,
        net: CaptionerModel,
        tokenizer: TokenizerLike,
        decoding: DecodingOptions,
        label_smoothing: float = 0.0,
        spice: bool = False,
    ) -> None:
        self.net, self.tokenizer, self.decoding = net, tokenizer, decoding
        self.label_smoothing, self.spice = label_smoothing, spice
        self.rows: dict[str, list[EvalRow]] = defaultdict(list)

    def generate(self, images: torch.Tensor, need_weights: bool = False) -> Generated:
        """Captions for a batch of normalised images, decoded with `self.decoding`."""
        tok = self.tokenizer
        return generate(
            self.net, images, tok.bos_id, tok.eos_id, tok.pad_id, self.decoding,
            need_weights=need_weights,
        )  # fmt: skip

    def caption_losses(self, batch: dict[str, Any]) -> ImageReliance:
        """Each caption's summed cross-entropy with its own image, with another image of the
        batch and with a blank one, and its number of target tokens: what a split's loss and
        its image gain add up, whichever process scored which image."""
        images, tokens = batch["images"], batch["tokens"]
        memory = self.net.encode(images)[0]
        blank = self.net.encode(torch.zeros_like(images[:1]))[0].expand_as(memory)
        shuffled = memory.roll(1, dims=0)  # each caption with its neighbour's image
        own = self._summed_losses(tokens, memory)
        share = None
        if self.net.config.decoder.kind == "prefix":  # its words weigh the image against text
            reading = self.net.decoder.features(tokens[:, :-1], Reading(memory, need_weights=True))
            share = image_share(reading.image_attention, tokens[:, 1:] != self.tokenizer.pad_id)
        return ImageReliance(
            own, self._summed_losses(tokens, shuffled), self._summed_losses(tokens, blank),
            (tokens[:, 1:] != self.tokenizer.pad_id).sum(1), share,
        )  # fmt: skip

    def _summed_losses(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        targets = tokens[:, 1:]
        logits = self.net.decoder(tokens[:, :-1], memory).logits
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=self.tokenizer.pad_id,
            label_smoothing=self.label_smoothing,
            reduction="none",
        )
        return losses.view_as(targets).sum(1)

    def add(self, batch: dict[str, Any]) -> None:
        """Decode and keep a batch's rows (an empty batch still shows its split exists)."""
        rows = self.rows[batch["split"]]  # a split whose every image is bad shows up
        if not batch["image_ids"]:  # every sample in it was bad and skipped
            return
        reliance = self.caption_losses(batch)
        scenes = batch.get("scenes")
        out = self.generate(batch["images"], need_weights=scenes is not None)
        size = len(batch["image_ids"])
        fields = zip(
            batch["image_ids"],
            batch["sources"],
            [self.tokenizer.decode(row.tolist()) for row in out.tokens],
            batch["references"],
            reliance.loss.tolist(),
            reliance.tokens.tolist(),
            reliance.shuffled.tolist() if size > 1 else [None],
            reliance.blank.tolist(),
            reliance.share.tolist() if reliance.share is not None else [None] * size,
            scenes or [None] * size,
            self._grounding_meters(out, list(scenes)) if scenes is not None else [None] * size,
            strict=True,
        )
        rows.extend(EvalRow(*row) for row in fields)

    def _grounding_meters(self, out: Generated, scenes: list[Any]) -> list[GroundingMeter]:
        """Each generated caption's word -> object looks, in a meter of its own, so that an image
        seen twice (DDP padding) can be counted once."""
        meters = []
        for scene, caption in zip(scenes, to_captions(out, self.tokenizer, self.net), strict=True):
            words = [w for w in caption.words if w != "<eos>"]
            assert caption.image_attention is not None
            meter = GroundingMeter(self.net.encoder.patch_size)
            boxes = [obj.box for obj in scene.objects]
            meter.update(caption.image_attention, scene.align(words), boxes)
            meters.append(meter)
        return meters

    def finish(self, sanity_checking: bool) -> tuple[dict[str, float], dict[str, dict]]:
        """Every split's metrics (`<split>/<name>`), the same on every process, and captions
        ({image id: caption}) on rank 0 (empty elsewhere); the rows are cleared for the next
        epoch.

        A split whose every image was bad (and skipped) stops the run with a `DataError` on
        every process: there would be no metric to report, and a checkpoint monitoring it
        would fail an epoch later. A sanity check sees a few batches only, so it is let pass.
        """
        parts = gather_rows(dict(self.rows))
        self.rows.clear()
        outcome: dict[str, Any] = {}
        captions: dict[str, dict] = {}
        if parts is not None:  # rank 0: score, or say why not, for every rank to act on
            try:
                outcome["metrics"], captions = self._score_splits(
                    merge_rows(parts), sanity_checking
                )
            except DataError as err:
                outcome["error"] = str(err)
        outcome = broadcast_object(outcome)
        if "error" in outcome:
            raise DataError(outcome["error"])
        return outcome["metrics"], captions

    def _score_splits(
        self, splits: dict[str, list[EvalRow]], sanity_checking: bool
    ) -> tuple[dict[str, float], dict[str, dict]]:
        metrics: dict[str, float] = {}
        captions: dict[str, dict] = {}
        for split, rows in splits.items():
            if not rows:
                if sanity_checking:
                    continue
                raise DataError(
                    f"every image of the {split} split was unusable and skipped (each is logged "
                    "above): fix or replace them, or point the data config at usable images."
                )
            metrics.update({f"{split}/{k}": v for k, v in self.score(split, rows).items()})
            captions[split] = {row.image_id: row.caption for row in rows}
        return metrics, captions

    def score(self, split: str, rows: list[EvalRow]) -> dict[str, float]:
        """The split's metrics over all of its images."""
        predictions = {row.image_id: row.caption for row in rows}
        references = {row.image_id: row.references for row in rows}
        is_test = split.startswith("test")  # validation runs no Java (`caption_scores`)
        metrics = caption_scores(
            predictions, references, meteor=is_test, spice=is_test and self.spice,
            fast=not is_test,
        )  # fmt: skip
        # per target token over the split, as a single process over one batch would have it
        metrics["loss"] = sum(row.loss for row in rows) / max(1, sum(row.tokens for row in rows))
        metrics.update(reliance_metrics(rows))
        if rows[0].scene is not None:  # ground truth known: is every caption fully correct?
            correct = [row.scene.caption_is_correct(row.caption) for row in rows]
            metrics["scene_acc"] = sum(correct) / len(correct)
        meters = [row.grounding for row in rows if row.grounding is not None]
        if meters:
            meter = GroundingMeter(self.net.encoder.patch_size)
            for part in meters:
                meter.merge(part)
            metrics.update(meter.compute())
        return metrics


class ImageReliance(NamedTuple):
    """A batch's summed caption losses (B,) with its own images, with each image swapped for
    its neighbour's, with a blank image; its target-token counts (B,); and, for a decoder
    whose words attend over image and text together, each caption's per-layer image share."""

    loss: torch.Tensor
    shuffled: torch.Tensor
    blank: torch.Tensor
    tokens: torch.Tensor
    share: torch.Tensor | None  # (B, layers)


def image_share(attention: list[torch.Tensor] | None, targets: torch.Tensor) -> torch.Tensor:
    """(B, layers): per caption and layer, the attention mass its words put on the image
    positions (mean over heads and real tokens), from each layer's (B, heads, T, S) rows."""
    assert attention is not None
    mask = targets.float()  # (B, T): 1 for a real token
    shares = [
        (layer.float().sum(-1).mean(1) * mask).sum(1) / mask.sum(1).clamp(min=1)
        for layer in attention
    ]  # each (B,)
    return torch.stack(shares, dim=1)


def reliance_metrics(rows: list[EvalRow]) -> dict[str, float]:
    """Is the model reading the image? `image_gain`: nats per token the right image saves
    against another image of the batch (about 0 for a decoder that ignores the image);
    `blank_gain`: the same against a blank image; how varied the captions are (a language
    prior writes one caption for every image); per layer, the share of attention on the
    image, for decoders where words weigh it against text."""
    tokens = max(1, sum(row.tokens for row in rows))
    own = sum(row.loss for row in rows)
    metrics = {"blank_gain": (sum(row.blank_loss for row in rows) - own) / tokens}
    paired = [row for row in rows if row.shuffled_loss is not None]
    if paired:
        gain = sum(row.shuffled_loss - row.loss for row in paired)  # type: ignore[operator]
        metrics["image_gain"] = gain / max(1, sum(row.tokens for row in paired))
    captions = Counter(row.caption for row in rows)
    metrics["distinct_captions"] = len(captions) / len(rows)
    metrics["top_caption_share"] = captions.most_common(1)[0][1] / len(rows)
    metrics["vocab_used"] = float(len({w for c in captions for w in c.split()}))
    shares = [row.image_share for row in rows if row.image_share is not None]
    for layer, values in enumerate(zip(*shares, strict=True)):
        metrics[f"image_share/layer{layer}"] = sum(values) / len(values)
    return metrics


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(outputs: dict[str, list[EvalRow]]) -> list[dict[str, list[EvalRow]]] | None:
    """Every process's rows, per split, on rank 0 (None on the others)."""
    rank, world_size = _rank_and_world()
    if world_size == 1:
        return [outputs]
    parts: list[Any] = [None] * world_size
    dist.gather_object(outputs, parts if rank == 0 else None, dst=0)
    return parts if rank == 0 else None


def merge_rows(parts: list[dict[str, list[EvalRow]]]) -> dict[str, list[EvalRow]]:
    """The processes' rows per split, each image once.

    A row seen twice from the same source is dropped: a sampler that pads the last batch by
    repeating images (Lightning's under FSDP) must not count it twice. Two sources under
    one image id are a `DataError`: keeping one would silently leave the other unscored.
    """
    merged: dict[str, dict[Any, EvalRow]] = {}
    for part in parts:
        for split, rows in part.items():
            unique = merged.setdefault(split, {})
            for row in rows:
                first = unique.setdefault(row.image_id, row)
                if first.source != row.source:
                    raise DataError(
                        f"image id {row.image_id!r} names two images of the {split} split, "
                        f"{first.source} and {row.source}: give every image its own id."
                    )
    return {split: list(rows.values()) for split, rows in merged.items()}


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if _rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
