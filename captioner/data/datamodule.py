"""LightningDataModules: a shared base for loaders and vocabulary, and the shapes data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from captioner.data.collate import CaptionCollator
from captioner.data.shapes import ShapesDataset, ShapesWorld
from captioner.data.tokenizer import Tokenizer
from captioner.data.transforms import ImagePreprocess
from captioner.errors import ConfigError


class CaptionDataModule(LightningDataModule):
    """Loaders for train / val / one or more test splits, and the training vocabulary.

    Subclasses provide `datasets()` (split name -> Dataset; names starting with "test" are test
    sets), `training_captions()` and `preprocess`, the image preprocessing that checkpoints keep.
    """

    preprocess: ImagePreprocess

    def __init__(
        self, batch_size: int, num_workers: int, max_len: int, min_freq: int, pin_memory: bool
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        if max_len < 3:
            raise ConfigError(f"data.max_len must be >= 3 (<bos>, a word, <eos>), got {max_len}.")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_len, self.min_freq, self.pin_memory = max_len, min_freq, pin_memory
        self._tokenizer: Tokenizer | None = None
        self._datasets: dict[str, Dataset] | None = None

    def datasets(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def training_captions(self) -> Iterable[str]:
        raise NotImplementedError

    @property
    def tokenizer(self) -> Tokenizer:
        """Built once from the training captions only, so no test word leaks into training."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.build(self.training_captions(), self.min_freq)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use a checkpoint's vocabulary instead of building one (evaluation, resuming)."""
        self._tokenizer = tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self._datasets is None:
            self._datasets = self.datasets()

    def transfer_batch_to_device(
        self, batch: dict[str, Any], device: torch.device, dataloader_idx: int
    ) -> dict[str, Any]:
        """Move the tensors only; references and ground-truth scenes stay plain Python."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        assert self._datasets is not None
        return DataLoader(
            self._datasets[split],
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=CaptionCollator(self.tokenizer, self.preprocess, self.max_len, split, train),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> list[DataLoader]:
        self.setup()
        assert self._datasets is not None
        names = [name for name in self._datasets if name.startswith("test")]
        return [self._loader(name, train=False) for name in names]


class ShapesDataModule(CaptionDataModule):
    """Procedural scenes (`data=shapes`): no files, any size, with ground truth.

    With `holdout_combos`, those colour-shape pairs never appear in train/val/test and form
    the extra `test_comp` split.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        num_train: int = 50_000,
        num_val: int = 500,
        num_test: int = 1000,
        grid: int = 2,
        min_objects: int = 1,
        max_objects: int = 3,
        captions_per_image: int = 5,
        holdout_combos: Sequence[Sequence[str]] = (),
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        max_len: int = 32,
        min_freq: int = 1,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, max_len, min_freq, pin_memory)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}.")
        self.world = ShapesWorld(
            image_size, grid, min_objects, max_objects, captions_per_image, holdout_combos, seed
        )
        self.preprocess = ImagePreprocess(self.world.image_size)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        if self.world.holdout:
            self.sizes["test_comp"] = num_test

    def datasets(self) -> dict[str, Dataset]:
        return {split: ShapesDataset(self.world, split, n) for split, n in self.sizes.items()}

    def training_captions(self) -> Iterable[str]:
        for index in range(self.sizes["train"]):
            yield from self.world.scene("train", index).captions
