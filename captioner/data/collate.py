"""Batching: stack images, normalise them, and tokenise one reference caption per image."""

from __future__ import annotations

from typing import Any

import torch

from captioner.data.tokenizer import Tokenizer

# Images are stored as uint8 and mapped to [-1, 1]; checkpoints record these numbers.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, normalised with IMAGE_MEAN / IMAGE_STD."""
    mean = torch.tensor(IMAGE_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


class CaptionCollator:
    """Turns samples into a batch; training picks a random reference per image each time.

    The batch keeps every reference (for scoring), the split name (for metric prefixes) and,
    when the dataset has it, each image's ground-truth scene.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, split: str, train: bool) -> None:
        self.tokenizer, self.max_len, self.split, self.train = tokenizer, max_len, split, train

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
            "images": normalize(torch.stack([s["image"] for s in samples])),
            "tokens": tokens,  # (B, T): <bos> words <eos> <pad>...
            "image_ids": [s["image_id"] for s in samples],
            "references": references,
            "split": self.split,
        }
        if "scene" in samples[0]:
            batch["scenes"] = [s["scene"] for s in samples]
        return batch
