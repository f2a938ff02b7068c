"""Batching: stack images, normalise them, and tokenise one reference caption per image."""

from __future__ import annotations

from typing import Any

import torch

from captioner.data.tokenizer import Tokenizer
from captioner.data.transforms import ImagePreprocess


class CaptionCollator:
    """Turns samples into a batch; training picks a random reference per image each time.

    The batch keeps every reference (for scoring), the split name (for metric prefixes) and,
    when the dataset has it, each image's ground-truth scene.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        preprocess: ImagePreprocess,
        max_len: int,
        split: str,
        train: bool,
    ) -> None:
        self.tokenizer, self.preprocess, self.max_len = tokenizer, preprocess, max_len
        self.split, self.train = split, train

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        references = [s["captions"] for s in samples]
        if self.train:
            picks = torch.randint(0, 1 << 30, (len(samples),)).tolist()
            captions = [refs[p % len(refs)] for refs, p in zip(references, picks, strict=True)]
        else:
            captions = [refs[0] for refs in references]
        ids = [self.tokenizer.encode(c, self.max_len) for c in captions]
        tokens = torch.full((len(ids), max(map(len, ids))), self.tokenizer.pad_id)
        for row, seq in enumerate(ids):
            tokens[row, : len(seq)] = torch.tensor(seq)
        batch = {
            "images": self.preprocess.normalize(torch.stack([s["image"] for s in samples])),
            "tokens": tokens,  # (B, T): <bos> words <eos> <pad>...
            "image_ids": [s["image_id"] for s in samples],
            "references": references,
            "split": self.split,
        }
        if "scene" in samples[0]:
            batch["scenes"] = [s["scene"] for s in samples]
        return batch
