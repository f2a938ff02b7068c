"""Batching: stack images, normalise them, and tokenise one reference caption per image."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from captioner.core.images import ImagePreprocess
from captioner.core.tokenizer import Tokenizer
from captioner.data.features import FeatureStore
from captioner.data.policy import BAD, BadSample


class Opaque:
    """A list Lightning's batch handling does not walk into: the ground-truth scenes are frozen
    dataclasses, which its input conversion (e.g. `precision=bf16-true`) refuses."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class CaptionCollator:
    """Turns samples into a batch; training picks a random reference per image each time.

    The batch keeps every reference (for scoring), where each image came from (`sources`: two
    images under one id are an error, not a silent loss), the split name (for metric
    prefixes) and,
    when the dataset has it, each image's ground-truth scene, with `word_boxes` (B, T, 4): the
    pixel box of the object each token names (zeros where it names none), for attention
    supervision. Samples that came back as
    `{BAD: BadSample}` are left out and listed under `bad_samples`, for the main process to
    apply the bad-sample policy; a sample may fix its training caption under `caption`.
    With a `FeatureStore`, each sample's stored encoder output (its `row`) comes as
    `features` (B, S, D) instead of `images`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        preprocess: ImagePreprocess,
        max_len: int,
        split: str,
        train: bool,
        features: FeatureStore | None = None,
    ) -> None:
        self.tokenizer, self.preprocess, self.max_len = tokenizer, preprocess, max_len
        self.split, self.train, self.features = split, train, features

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        stored = None
        if self.features is not None:
            samples = [s for s in samples if BAD not in s]
            values, valid = self.features.read([s["row"] for s in samples])
            for sample, ok in zip(samples, valid, strict=True):
                if not ok:  # its image was unreadable when the store was built
                    sample[BAD] = BadSample(sample["source"], "unreadable (feature store)")
            stored = torch.from_numpy(values[valid])
        bad = [s[BAD] for s in samples if BAD in s]
        samples = [s for s in samples if BAD not in s]
        references = [s["captions"] for s in samples]
        if self.train:  # each sample's own draw (`seeded_sample`)
            picks = [s["draw"] % len(refs) for s, refs in zip(samples, references, strict=True)]
        else:
            picks = [0] * len(samples)
        captions = [
            s.get("caption") or refs[p]
            for s, refs, p in zip(samples, references, picks, strict=True)
        ]
        ids = [self.tokenizer.encode(c, self.max_len) for c in captions]
        tokens = torch.full((len(ids), max(map(len, ids), default=2)), self.tokenizer.pad_id)
        for row, seq in enumerate(ids):
            tokens[row, : len(seq)] = torch.tensor(seq)
        batch: dict[str, Any] = {
            "tokens": tokens,  # (B, T): <bos> words <eos> <pad>...
            "image_ids": [s["image_id"] for s in samples],
            "sources": [s["source"] for s in samples],  # the file or shard entry of each image
            "references": references,
            "split": self.split,
            "bad_samples": bad,
        }
        if stored is not None:
            batch["features"] = stored  # (B, S, D) float16
        else:  # no sample left (every one bad): an empty batch, which the model skips
            empty = torch.zeros(0, 3, *self.preprocess.image_size, dtype=torch.uint8)
            images = torch.stack([s["image"] for s in samples]) if samples else empty
            batch["images"] = self.preprocess.normalize(images)  # (B, 3, H, W)
        if samples and "scene" in samples[0]:
            scenes = [s["scene"] for s in samples]
            batch["scenes"] = Opaque(scenes)
            batch["word_boxes"] = word_boxes(scenes, picks, tokens.shape[1])
        return batch


def word_boxes(scenes: list[Any], picks: list[int], length: int) -> torch.Tensor:
    """(B, length, 4) float pixel boxes (x0, y0, x1, y1) of the object that token i of
    reference `picks[b]` of scene b names; zeros for `<bos>`, `<eos>`, padding and words that
    name no object. Token i is word i - 1, as `Tokenizer.encode` lays them out."""
    boxes = torch.zeros(len(scenes), length, 4)
    for row, (scene, pick) in enumerate(zip(scenes, picks, strict=True)):
        for word, k in enumerate(scene.alignments[pick][: length - 2]):
            if k >= 0:
                boxes[row, word + 1] = torch.tensor(scene.objects[k].box, dtype=torch.float32)
    return boxes
