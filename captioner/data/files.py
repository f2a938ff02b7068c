"""Image files on disk with annotation files: COCO, Karpathy splits, Flickr, JSONL/CSV.

Each format is a thin DataModule over `read_*` from `records.py`; loading, augmentation, the
bad-sample policy, the vocabulary cache and the checks that catch a wrong image folder at
start-up are shared here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from captioner.core.errors import ConfigError, DataError, ImageLoadError
from captioner.core.images import load_image
from captioner.core.tokenizer import tokenizer_settings
from captioner.data.cache import data_key
from captioner.data.datamodule import ImageDataModule
from captioner.data.policy import BAD, BadSample
from captioner.data.records import Record, read_coco, read_flickr, read_karpathy, read_table

TRAIN_CAPTIONS = ("one", "all")
CHECKED_IMAGES = 16  # images stat'ed at start-up to catch a wrong image folder


class ImageCaptionDataset(Dataset):
    """Records as samples, images loaded lazily; an unreadable image becomes a `BadSample`.

    With `every_caption`, each (image, caption) pair is one sample, so an epoch sees every
    caption; otherwise each image is one sample and the collator draws one of its captions.
    `at_least` is `load_image`'s: the size below which decoding does not shrink an image.
    Without a `transform` the image is not read at all: its stored features (`row`) are.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], torch.Tensor] | None,
        every_caption: bool = False,
        at_least: tuple[int, int] | None = None,
    ) -> None:
        self.records, self.transform, self.at_least = records, transform, at_least
        self.index = [
            (i, j if every_caption else None)
            for i, record in enumerate(records)
            for j in range(len(record.captions) if every_caption else 1)
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position, caption = self.index[index]
        record = self.records[position]
        sample = {
            "captions": list(record.captions), "image_id": record.image_id, "row": position,
            "source": str(record.image),
        }  # fmt: skip
        if self.transform is not None:
            try:
                sample["image"] = self.transform(load_image(record.image, at_least=self.at_least))
            except ImageLoadError as err:  # named as the file and where the data lists it
                where = f" (listed at {record.source})" if record.source else ""
                return {BAD: BadSample(err.source + where, err.reason)}
        if caption is not None:
            sample["caption"] = record.captions[caption]
        return sample


class FileCaptionDataModule(ImageDataModule):
    """Shared by every image-file format: subclasses say how to read a split (`read`), which
    files define the training data (`training_sources`) and which key names the image folder.
    """

    image_key = "data.image_dir"
    sources: dict[str, Any]  # split -> what names its data (a file, a split list); None: absent

    def __init__(self, train_captions: str = "one", **common: Any) -> None:
        super().__init__(**common)
        if train_captions not in TRAIN_CAPTIONS:
            raise ConfigError(
                f"data.train_captions must be one of {list(TRAIN_CAPTIONS)}, got "
                f"{train_captions!r}: 'one' draws a caption per image each epoch, 'all' visits "
                "every caption."
            )
        self.every_caption = train_captions == "all"
        self._records: dict[str, list[Record]] = {}

    def read(self, split: str) -> tuple[list[Record], list[BadSample]]:
        """The split's records (from `sources[split]`) and the entries dropped reading them."""
        raise NotImplementedError

    def training_sources(self) -> list[Path]:
        """The annotation files that decide the training captions (the vocabulary's key)."""
        return [Path(self.sources["train"])]

    def records(self, split: str) -> list[Record]:
        """Read once; the dropped entries go through the bad-sample policy right away."""
        if split not in self._records:
            records, bad = self.read(split)
            self.bad_samples.report(bad)
            if not records:
                raise DataError(f"the {split} split has no usable images and captions.")
            self._check_images(split, records)
            self._records[split] = records
        return self._records[split]

    def _check_images(self, split: str, records: Sequence[Record]) -> None:
        """A wrong image folder fails now, not as thousands of skipped samples later."""
        sample = [r.image for r in records[:CHECKED_IMAGES]]
        if not any(path.is_file() for path in sample):
            raise DataError(
                f"none of the first {len(sample)} images of the {split} split exists (e.g. "
                f"{sample[0]}): check {self.image_key}."
            )

    def split_names(self) -> list[str]:
        return [split for split, source in self.sources.items() if source is not None]

    def dataset(self, split: str, scan: bool = False) -> Dataset:
        records = self.records(split)
        every_caption = split == "train" and self.every_caption and not scan
        transform = self.image_transform(split, scan)
        return ImageCaptionDataset(records, transform, every_caption, self.decode_size(scan))

    def training_references(self) -> Iterable[Sequence[str]]:
        for record in self.records("train"):
            yield record.captions

    def feature_images(self, split: str) -> Dataset:
        records = self.records(split)
        return ImageCaptionDataset(
            records, self.preprocess.resize, at_least=self.decode_size(False)
        )

    def data_identity(self) -> str:
        return data_key(self.training_sources(), {"format": type(self).__name__}, True)

    def default_feature_dir(self) -> Path:
        return self.training_sources()[0].parent / "features"

    def training_cache_file(self, kind: str) -> Path | None:
        sources = self.training_sources()
        for path in sources:
            if not path.is_file():
                raise DataError(f"{path}: no such file; check the training annotation keys.")
        key = data_key(sources, self.vocab_settings(), read_contents=True)
        return sources[0].with_name(f"{sources[0].name}.{kind}-{key}.json")

    def vocab_settings(self) -> dict[str, Any]:
        """What besides the files decides the training captions (e.g. which splits)."""
        return {**tokenizer_settings(self.min_freq), "format": type(self).__name__}


class CocoDataModule(FileCaptionDataModule):
    """COCO captions (`data=coco`): `captions_*.json` files and one image folder."""

    def __init__(
        self,
        image_dir: str,
        train_json: str,
        val_json: str,
        test_json: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.image_dir = Path(image_dir)
        self.sources = {"train": train_json, "val": val_json, "test": test_json}

    def read(self, split: str) -> tuple[list[Record], list[BadSample]]:
        return read_coco(self.sources[split], self.image_dir, self.bad_samples.policy)


class KarpathySplitDataModule(FileCaptionDataModule):
    """Karpathy's splits (`data=karpathy`): `dataset_{coco,flickr8k,flickr30k}.json` and an
    image root; the train/val/test split that captioning papers report on."""

    image_key = "data.image_root"

    def __init__(
        self,
        split_file: str,
        image_root: str,
        train_splits: Sequence[str] = ("train", "restval"),
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.split_file, self.image_root = Path(split_file), Path(image_root)
        self.sources = {"train": list(train_splits), "val": ["val"], "test": ["test"]}

    def read(self, split: str) -> tuple[list[Record], list[BadSample]]:
        policy = self.bad_samples.policy
        return read_karpathy(self.split_file, self.image_root, self.sources[split], policy)

    def training_sources(self) -> list[Path]:
        return [self.split_file]

    def vocab_settings(self) -> dict[str, Any]:
        return {**super().vocab_settings(), "train_splits": self.sources["train"]}


class FlickrDataModule(FileCaptionDataModule):
    """Flickr8k / Flickr30k in their own formats (`data=flickr`): a captions file
    (`Flickr8k.token.txt`, `results_20130124.token`, `results.csv` or `captions.txt`) and a
    list of image names per split (`Flickr_8k.trainImages.txt`)."""

    def __init__(
        self,
        captions_file: str,
        image_dir: str,
        train_list: str,
        val_list: str,
        test_list: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.captions_file, self.image_dir = Path(captions_file), Path(image_dir)
        self.sources = {"train": train_list, "val": val_list, "test": test_list}

    def read(self, split: str) -> tuple[list[Record], list[BadSample]]:
        names = self.sources[split]
        return read_flickr(self.captions_file, self.image_dir, names, self.bad_samples.policy)

    def training_sources(self) -> list[Path]:
        return [self.captions_file, Path(self.sources["train"])]


class TableDataModule(FileCaptionDataModule):
    """Your own data (`data=jsonl`): JSONL lines `{"image": path, "caption": str | [str]}`
    or CSV/TSV with `image` and `caption` columns, one file per split."""

    image_key = "data.image_root"

    def __init__(
        self,
        train_file: str,
        val_file: str,
        test_file: str | None = None,
        image_root: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.sources = {"train": train_file, "val": val_file, "test": test_file}
        self.image_root = image_root

    def read(self, split: str) -> tuple[list[Record], list[BadSample]]:
        return read_table(self.sources[split], self.image_root, self.bad_samples.policy)
