"""LightningDataModules: a shared base for loaders, vocabulary and bad samples; the shapes data."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import FSDPStrategy
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from captioner.core.errors import CheckpointError, ConfigError
from captioner.core.images import ImagePreprocess, image_size_pair
from captioner.core.seeding import mix_seed
from captioner.core.tokenizer import Tokenizer
from captioner.core.values import is_int, short
from captioner.data.augment import TrainAugment
from captioner.data.cache import cached_tokenizer
from captioner.data.collate import CaptionCollator
from captioner.data.features import FeatureStore
from captioner.data.policy import BAD, BadSampleLog
from captioner.data.shapes import ShapesDataset, ShapesWorld


def _usable_cpus() -> int:
    """The CPUs this process may run on (a job's share of a node, not the whole node)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class EpochShuffle(DistributedSampler):
    """A new training order every pass, drawn from the run's seed and the epoch alone, so a
    resumed run sees the order the uninterrupted one would have, whatever else drew random
    numbers before. Under DDP each process takes every `world_size`-th index of one shared
    order (the same number each, so ranks stay in step); being a DistributedSampler, Lightning
    leaves it as it is. It counts epochs itself, one a pass from `epoch` on, and leaves `skip`
    indices out of the first pass only: where a checkpoint says training was."""

    def __init__(
        self,
        size: int,
        seed: int,
        epoch: int = 0,
        skip: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(range(size), num_replicas=world_size, rank=rank, drop_last=True)
        self.size, self.seed, self.epoch, self.skip = size, seed, epoch, skip

    def set_epoch(self, epoch: int) -> None:
        """Ignored: after a checkpoint written when `max_steps` ended a run mid-epoch, Lightning
        goes on with that epoch's batches but passes the next epoch's number here."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(index, epoch) pairs, for `SeededSamples`."""
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        order = torch.randperm(self.size, generator=generator)[: self.total_size]
        return ((i, epoch) for i in order[self.rank :: self.num_replicas][skip:].tolist())


class SeededSamples(Dataset):
    """Training samples whose random choices (the augmentation's crop, and the reference
    caption drawn, under "draw") come from (seed, epoch, index) alone: the same in a resumed
    run as in an uninterrupted one, whichever loader process reads the sample."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        return seeded_sample(mix_seed(self.seed, epoch, index), lambda: self.dataset[index])


def _check_position(state: Any) -> None:
    """A recorded place in the data holds non-negative integers (the seed: any 64-bit one)."""
    keys = ("epoch", "batches", "batch_size", "world_size", "samples")
    valid = isinstance(state, dict) and is_int(state.get("seed")) and abs(state["seed"]) < 2**64
    valid = valid and all(is_int(state.get(k, 0)) and state.get(k, 0) >= 0 for k in keys)
    if not valid or not all(k in state for k in keys[:2]):
        raise CheckpointError(
            f"the checkpoint's place in the data ({short(state)}) is not valid: the file is "
            "damaged or was not written by scripts/train.py."
        )


def seeded_sample(seed: int, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`read()` with torch's generator seeded by `seed` (its augmentation), plus one draw
    under "draw" (which reference caption it trains on), the caller's generator untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sample = read()
        sample["draw"] = int(torch.randint(0, 1 << 30, ()))
    return sample


class CaptionDataModule(LightningDataModule):
    """Loaders for train / val / one or more test splits, and the training vocabulary.

    Subclasses provide `split_names()` (from the config alone; names starting with "test" are
    test sets), `dataset(split)`, `training_references()` and `preprocess`, the image
    preprocessing that checkpoints keep; `training_cache_file(kind)` when what is built from the
    training captions (the vocabulary, CIDEr-D statistics) is worth caching. A split's data is
    read only when its loader is asked for, so evaluating a checkpoint needs its test data, not
    the training data. Bad samples reach the main
    process in each batch and go to `bad_samples`, which applies `data.on_bad_sample`.

    With `cache_features`, training reads a frozen encoder's outputs from a `FeatureStore`
    (`store_features`, before the first epoch) instead of images: subclasses that support it
    provide `feature_images(split)` (each distinct image once, un-augmented, its index the
    `row` its samples carry), `data_identity()` and `default_feature_dir()`.
    """

    preprocess: ImagePreprocess
    augment: TrainAugment | None = None  # training-time image transform, if any
    features: FeatureStore | None = None  # the training split's stored encoder outputs
    feature_seconds = 0.0  # spent building (or checking) the store

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None,
        max_len: int,
        min_freq: int,
        pin_memory: bool,
        on_bad_sample: str = "error",
        cache_features: bool = False,
        feature_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.cache_features, self.feature_dir = cache_features, feature_dir
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
        if num_workers is None:  # one loader process per CPU this process may use
            num_workers = min(_usable_cpus(), 8)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        if max_len < 3:
            raise ConfigError(f"data.max_len must be >= 3 (<bos>, a word, <eos>), got {max_len}.")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_len, self.min_freq, self.pin_memory = max_len, min_freq, pin_memory
        self.bad_samples = BadSampleLog(on_bad_sample)
        self._tokenizer: Tokenizer | None = None
        self._datasets: dict[str, Dataset] = {}
        # the run's seed (as `seed_everything` left it), for the training order and draws
        self.run_seed = torch.initial_seed()
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self._resume_samples: int | None = None  # the training split size it records

    def split_names(self) -> list[str]:
        """The splits this config names, without reading any data."""
        raise NotImplementedError

    def dataset(self, split: str, scan: bool = False) -> Dataset:
        """One split; `scan`: every sample once, in order, images decoded but not kept (what
        `scripts/validate_data.py` reads)."""
        raise NotImplementedError

    def image_transform(self, split: str, scan: bool) -> Callable[[Image.Image], Any] | None:
        """Augmented pixels for training, the whole image resized otherwise; nothing kept
        when scanning."""
        if scan:
            return _discard
        if split == "train" and self.features is not None:
            return None  # the stored features stand for the image: it is not even read
        if split == "train" and self.augment is not None:
            return self.augment
        return self.preprocess.resize

    def decode_size(self, scan: bool) -> tuple[int, int] | None:
        """`load_image`'s `at_least`: images are shrunk while decoded to twice the model's
        input; when scanning, decoded whole, so every byte is checked."""
        return None if scan else self.preprocess.image_size

    def training_references(self) -> Iterable[Sequence[str]]:
        """Every training image's captions, one list per image."""
        raise NotImplementedError

    def training_cache_file(self, kind: str) -> Path | None:
        """Where something built from the training captions (`kind`: "vocab", "cider-df") is
        cached: a name keyed on the data and its settings; None: not cached."""
        return None

    @property
    def tokenizer(self) -> Tokenizer:
        """Built once from the training captions only, so no test word leaks into training."""
        if self._tokenizer is None:
            cache_file = self.training_cache_file("vocab")
            captions = chain.from_iterable(self.training_references())
            build = partial(Tokenizer.build, captions, self.min_freq)
            self._tokenizer = build() if cache_file is None else cached_tokenizer(build, cache_file)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use a checkpoint's vocabulary instead of building one (evaluation, resuming)."""
        self._tokenizer = tokenizer

    def use_preprocess(self, preprocess: ImagePreprocess) -> None:
        """The model's preprocessing (a pretrained encoder's statistics and interpolation)
        instead of the data's default, for every split and the training augmentation."""
        self.preprocess = preprocess
        if self.augment is not None:
            self.augment = replace(self.augment, preprocess=preprocess)

    def transfer_batch_to_device(
        self, batch: dict[str, Any], device: torch.device, dataloader_idx: int
    ) -> dict[str, Any]:
        """Apply the bad-sample policy to what the workers found, then move the tensors only;
        references and ground-truth scenes stay plain Python."""
        self.bad_samples.report(batch.pop("bad_samples", ()))
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def collator(self, split: str, train: bool) -> CaptionCollator:
        features = self.features if split == "train" else None
        return CaptionCollator(
            self.tokenizer, self.preprocess, self.max_len, split, train, features
        )

    def feature_images(self, split: str) -> Dataset:
        """Each distinct image of `split` once, un-augmented, in row order."""
        raise ConfigError(
            f"data.cache_features=true is not supported by {type(self).__name__}: it needs "
            "images that can be read by index (data=coco, karpathy, flickr, jsonl, shapes)."
        )

    def data_identity(self) -> str:
        """What the stored features of the training split depend on besides the encoder."""
        raise NotImplementedError

    def default_feature_dir(self) -> Path:
        raise NotImplementedError

    def store_features(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        encoder: dict[str, Any],
        tokens: int,
        dim: int,
        writer: bool = True,
    ) -> FeatureStore:
        """Encode every training image once (`encode`: a normalised batch -> its tokens) into
        a store keyed on `encoder` (a description of it and its weights), the preprocessing
        and the data, or reuse the store already there for that key; other DDP ranks
        (`writer=False`) wait for rank 0's. Training then reads the store (no augmentation:
        each image has one stored view)."""
        images = self.feature_images("train")
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(encoder["name"]))
        folder = Path(self.feature_dir or self.default_feature_dir()) / f"train-{name}"
        key = {
            "encoder": encoder, "preprocess": self.preprocess.to_dict(),
            "data": self.data_identity(), "split": "train",
        }  # fmt: skip
        store = FeatureStore(folder, key, len(images), tokens, dim)  # type: ignore[arg-type]
        start = time.perf_counter()
        store.ensure(self._encoder_rows(images, encode, (tokens, dim)), self.batch_size, writer)
        self.feature_seconds = time.perf_counter() - start
        self.features = store
        self._datasets.pop("train", None)  # built again, reading the store instead of images
        return store

    def _encoder_rows(
        self,
        images: Dataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        shape: tuple[int, int],
    ) -> Callable[[int, int], tuple[Any, Any]]:
        """`FeatureStore.ensure`'s `encode(start, stop)`: consecutive chunks, read by one
        loader from the first row asked for (images decode in its workers)."""
        state: dict[str, Any] = {"next": None, "batches": None}

        def rows(start: int, stop: int) -> tuple[Any, Any]:
            if state["next"] != start:
                subset = torch.utils.data.Subset(images, range(start, len(images)))  # type: ignore[arg-type]
                loader = DataLoader(
                    subset, batch_size=self.batch_size, num_workers=self.num_workers,
                    collate_fn=list,
                )  # fmt: skip
                state["batches"] = iter(loader)
            samples = next(state["batches"])
            assert len(samples) == stop - start
            state["next"] = stop
            self.bad_samples.report([s[BAD] for s in samples if BAD in s])
            valid = torch.tensor([BAD not in s for s in samples])
            good = [s["image"] for s in samples if BAD not in s]
            features = torch.zeros(len(samples), *shape)  # a bad image's row stays zeros
            if good:
                features[valid] = encode(self.preprocess.normalize(torch.stack(good))).float()
            return features.numpy(), valid.numpy()

        return rows

    def split(self, name: str) -> Dataset:
        """The split's dataset, built on first use."""
        if name not in self._datasets:
            self._datasets[name] = self.dataset(name)
        return self._datasets[name]

    def pins_memory(self) -> bool:
        """Pinned batches let the copy to the GPU overlap compute; with no GPU to copy to,
        pinning would only cost time (and PyTorch warns), so `pin_memory` asks only then."""
        return (
            self.pin_memory
            and self.trainer is not None
            and self.trainer.strategy.root_device.type == "cuda"
        )

    def eval_sampler(self, split: str) -> Sampler | None:
        """Under DDP, this process's share of an evaluation split, every image in exactly one
        share. Lightning's own DistributedSampler would pad the last batch with repeats; ranks
        may then run one batch fewer, which evaluation allows. Not under FSDP, whose every
        forward needs all ranks: there the repeats stay, and scoring counts each image once.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1 or isinstance(trainer.strategy, FSDPStrategy):
            return None
        dataset = self.split(split)
        if len(dataset) < trainer.world_size:
            raise ConfigError(
                f"the {split} split has {len(dataset)} images for {trainer.world_size} processes: "
                "every process needs at least one; use fewer devices or more images."
            )
        return UnrepeatedDistributedSampler(
            dataset, shuffle=False, **trainer.distributed_sampler_kwargs
        )

    def state_dict(self) -> dict[str, int]:
        """Where training is in its data, kept in every checkpoint: the run's seed, the epoch
        and the batches of it already trained on, so a resumed run goes on from the next batch
        of the same order; and the batch size, process count and training split size those
        batches are counted in."""
        if self.trainer is None:
            return {}
        batches = self.trainer.fit_loop.epoch_loop.batch_progress
        state = {
            "seed": self.run_seed, "epoch": self.trainer.current_epoch,
            "batch_size": self.batch_size, "world_size": self.trainer.world_size,
        }  # fmt: skip
        train = self._datasets.get("train")
        if train is not None and not isinstance(train, IterableDataset):
            state["samples"] = len(train)  # type: ignore[arg-type]
        if batches.is_last_batch:  # the epoch is over: the next one starts from its beginning
            return state | {"epoch": state["epoch"] + 1, "batches": 0}
        return state | {"batches": batches.current.ready}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resuming training (not validating or testing a checkpoint): the checkpoint's seed
        and place in the data, whatever `seed=` this run was given."""
        if state_dict and self.trainer is not None and self.trainer.state.fn == "fit":
            _check_position(state_dict)
            self._check_same_batches(state_dict)
            self.run_seed = state_dict["seed"]
            self._resume = state_dict["epoch"], state_dict["batches"]
            self._resume_samples = state_dict.get("samples")
            fit_loop = self.trainer.fit_loop
            if fit_loop._combined_loader is not None:
                # built before this restore (FSDP and DeepSpeed restore after setup, where the
                # scheduler counted the steps): built again from the checkpoint's place
                fit_loop._combined_loader = None

    def _check_same_batches(self, state: dict[str, int]) -> None:
        """The place in the data and the learning-rate schedule are counted in batches: a
        resumed run must cut the data into the same ones."""
        assert self.trainer is not None
        for key, now, name in (
            ("batch_size", self.batch_size, "data.batch_size"),
            ("world_size", self.trainer.world_size, "the number of processes (devices x nodes)"),
        ):
            if state.get(key, now) != now:
                raise ConfigError(
                    f"the checkpoint was trained with {name} = {state[key]}, this run has {now}: "
                    f"resume with {state[key]} (its place in the data and its learning-rate "
                    "schedule are counted in those batches), or start a new run."
                )

    def check_training_split(self, samples: int | None, per_epoch: int | None, skip: int) -> None:
        """The training split as the checkpoint being resumed saw it (`samples` of them, if
        known), at least one batch an epoch, and the batches to skip fewer than an epoch:
        otherwise a run would train on nothing, or skip or repeat data, and still succeed."""
        recorded, self._resume_samples = self._resume_samples, None
        if samples is not None and recorded is not None and samples != recorded:
            raise ConfigError(
                f"the checkpoint was trained on {recorded} training samples, this run has "
                f"{samples}: its place in the data is counted in that split; resume with the "
                "same training data, or start a new run."
            )
        if per_epoch == 0:
            raise ConfigError(
                f"the training split has {samples} samples: less than one batch of "
                f"data.batch_size={self.batch_size} for each process; lower data.batch_size."
            )
        if per_epoch is not None and skip >= per_epoch:
            raise ConfigError(
                f"the checkpoint is {skip} batches into its epoch, but an epoch of this "
                f"training data has {per_epoch}: resume with the data it was trained on."
            )

    def training_position(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the train loader being built: a checkpoint's position
        once, after resuming, else the start of the current epoch."""
        position, self._resume = self._resume, None
        if position is not None:
            return position
        return (self.trainer.current_epoch if self.trainer is not None else 0), 0

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.split(split)
        if train:
            epoch, batches = self.training_position()
            trainer = self.trainer
            world_size = trainer.world_size if trainer else 1
            per_epoch = len(dataset) // world_size // self.batch_size  # type: ignore[arg-type]
            self.check_training_split(len(dataset), per_epoch, batches)  # type: ignore[arg-type]
            dataset = SeededSamples(dataset, self.run_seed)
            sampler: Sampler | None = EpochShuffle(
                len(dataset), self.run_seed, epoch, skip=batches * self.batch_size,
                rank=trainer.global_rank if trainer else 0, world_size=world_size,
            )  # fmt: skip
        else:
            sampler = self.eval_sampler(split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pins_memory(),
            collate_fn=self.collator(split, train),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_splits(self) -> list[str]:
        """The splits tested after training: every split whose name starts with "test"."""
        return [name for name in self.split_names() if name.startswith("test")]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(name, train=False) for name in self.test_splits()]


class ImageDataModule(CaptionDataModule):
    """The keys every dataset of real images shares (`conf/data/common/images.yaml`)."""

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        batch_size: int = 64,
        num_workers: int | None = None,
        max_len: int = 32,
        min_freq: int = 5,
        pin_memory: bool = True,
        on_bad_sample: str = "error",
        augment: bool = True,
        min_crop_area: float = 0.8,
        cache_features: bool = False,
        feature_dir: str | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, max_len, min_freq, pin_memory, on_bad_sample,
            cache_features, feature_dir,
        )  # fmt: skip
        self.preprocess = ImagePreprocess(image_size_pair(image_size))
        self.augment = TrainAugment(self.preprocess, min_crop_area) if augment else None


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
        pin_memory: bool = True,
        cache_features: bool = False,
        feature_dir: str | None = None,
    ) -> None:
        super().__init__(
            batch_size, num_workers, max_len, min_freq, pin_memory, "error", cache_features,
            feature_dir,
        )  # fmt: skip
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

    def split_names(self) -> list[str]:
        return list(self.sizes)

    def dataset(self, split: str, scan: bool = False) -> Dataset:
        render = self.image_transform(split, scan) is not None
        return ShapesDataset(self.world, split, self.sizes[split], render)

    def feature_images(self, split: str) -> Dataset:
        return ShapesDataset(self.world, split, self.sizes[split])

    def data_identity(self) -> str:
        world = self.world
        return repr((world.image_size, world.grid, world.min_objects, world.max_objects,
                     sorted(world.holdout), world.seed, self.sizes["train"]))  # fmt: skip

    def default_feature_dir(self) -> Path:
        raise ConfigError(
            "data.cache_features=true on shapes needs data.feature_dir: a folder for the store."
        )

    def training_references(self) -> Iterable[Sequence[str]]:
        for index in range(self.sizes["train"]):
            yield self.world.scene("train", index).captions


def _discard(image: Image.Image) -> None:
    """The scan transform: the image was decoded (so a broken one is found), then dropped."""
