"""WebDataset tar shards (`data=webdataset`): `{key}.jpg|png|webp` + `{key}.txt|json` pairs, as
img2dataset writes them, streamed with the `webdataset` library.

Shards are dealt out first across DDP ranks, then across each rank's loader workers, so every
sample is read once per epoch by exactly one worker. Training reshuffles the shard order each
epoch (the same order on every rank, then split) and shuffles samples in a buffer; validation
and test read a fixed shard list in order. An evaluation split with fewer shards than ranks
(one validation shard on eight GPUs) is dealt out by sample instead: every rank reads all of
the shards and keeps every `world_size`-th sample, so each is still scored exactly once.
A broken shard or sample becomes a `BadSample`, so the bad-sample policy applies in the
main process as for image files.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from captioner.core.errors import ConfigError, DataError, ImageLoadError
from captioner.core.images import load_image
from captioner.core.seeding import mix_seed
from captioner.core.tokenizer import caption_problem, one_line, tokenizer_settings
from captioner.core.values import DuplicateKey, loads_unique
from captioner.data.cache import data_key
from captioner.data.datamodule import ImageDataModule, seeded_sample
from captioner.data.policy import BAD, BadSample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")


def expand_shards(spec: str | Sequence[str], key: str) -> list[str]:
    """Brace-expanded shard paths or URLs."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    try:
        shards = [shard for pattern in patterns for shard in braceexpand.braceexpand(pattern)]
    except braceexpand.UnbalancedBracesError as err:
        raise ConfigError(f"{key}: {err}; close every brace, or escape it as \\{{.") from None
    except RecursionError:
        raise ConfigError(f"{key}: braces nested too deeply to expand.") from None
    if not shards:
        raise ConfigError(f"{key} names no shards: give a path like 'data/{{00000..00099}}.tar'.")
    return shards


def check_shards(shards: Sequence[str], key: str) -> None:
    """Local shards must exist (remote ones are found out when read)."""
    local = [s for s in shards if not s.startswith(REMOTE_PREFIXES)]
    missing = [s for s in local if not Path(s.removeprefix("file:")).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(shards)} shards in {key} do not exist, e.g. "
            f"{missing[0]}: check the path and the brace range."
        )


def assign_shards(
    shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """This worker's shards: every `world_size`-th for the rank, then every `num_workers`-th."""
    return list(shards)[rank::world_size][worker::num_workers]


def sample_captions(raw: dict[str, Any]) -> list[str] | BadSample:
    """The captions of a tar sample: the `caption` of its `.json` (a string, or a list of
    every reference), else its `.txt`."""
    source = f"{raw.get('__url__', '?')}/{raw.get('__key__', '?')}"
    captions: Any = None
    if "json" in raw:
        try:
            captions = loads_unique(raw["json"]).get("caption")
        except DuplicateKey as err:
            return BadSample(f"{source}.json", f"{err} in one object")
        except (ValueError, RecursionError, AttributeError):  # invalid, huge numbers, too deep
            return BadSample(f"{source}.json", "not a readable JSON object")
    if captions is None and "txt" in raw:
        captions = raw["txt"].decode("utf-8", errors="replace")
    if captions is None:
        return BadSample(source, "no caption (.txt, or .json with a 'caption' key) in sample")
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return BadSample(f"{source}.json", "'caption' is not a string or a list of strings")
    kept = [line for line in map(one_line, captions) if line]  # an empty one among others: dropped
    problem = next(filter(None, map(caption_problem, kept or [""])), None)
    return BadSample(source, problem) if problem else kept


def decode_sample(
    raw: dict[str, Any],
    transform: Callable[[Image.Image], torch.Tensor],
    at_least: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A tar sample's bytes -> our sample, or `{BAD: BadSample}` naming shard and key."""
    source = f"{raw.get('__url__', '?')}/{raw.get('__key__', '?')}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        return {BAD: BadSample(source, f"no image (.{'/.'.join(IMAGE_EXTENSIONS)}) in sample")}
    captions = sample_captions(raw)
    if isinstance(captions, BadSample):
        return {BAD: captions}
    try:
        image = load_image(raw[image_ext], name=f"{source}.{image_ext}", at_least=at_least)
        pixels = transform(image)
    except ImageLoadError as err:
        return {BAD: BadSample(err.source, err.reason)}
    place = f"{source} (sample {raw['__position__']})" if "__position__" in raw else source
    return {"image": pixels, "captions": captions, "image_id": raw["__key__"], "source": place}


class ShardStream(IterableDataset):
    """The samples of a shard list, split across ranks and workers.

    `epoch` (set by `EpochLoader`) seeds the shard and buffer shuffles, so each epoch differs
    and every worker agrees on the shard order before taking its share. With `repeat` the
    stream never ends (the loader decides where an epoch stops). With `sample_seed` (training)
    a sample's random choices come from it, the epoch, the rank, the worker and the sample's
    place in that worker's stream, as `SeededSamples` does for files.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        repeat: bool = False,
        sample_seed: int | None = None,
        at_least: tuple[int, int] | None = None,
    ) -> None:
        self.shards, self.transform, self.shuffle = list(shards), transform, shuffle
        self.at_least = at_least
        self.shuffle_buffer, self.seed, self.repeat = shuffle_buffer, seed, repeat
        self.sample_seed = sample_seed
        self.rank, self.world_size, self.epoch = 0, 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        while True:
            shards = list(self.shards)
            if self.shuffle:
                random.Random(f"{self.seed}/{epoch}").shuffle(shards)
            by_sample = not self.shuffle and len(shards) < self.world_size
            rank, world_size = (0, 1) if by_sample else (self.rank, self.world_size)
            mine = assign_shards(shards, rank, world_size, worker, num_workers)
            if not mine:  # more workers than shards: this one has nothing to read, ever
                return
            samples = read_shards(mine)
            if by_sample:  # every rank reads the same stream in the same order: take a share
                samples = islice(samples, self.rank, None, self.world_size)
            if self.shuffle and self.shuffle_buffer > 1:
                rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                    samples
                )
            for position, raw in enumerate(samples):
                if BAD in raw:
                    yield raw
                    continue
                decode = partial(decode_sample, raw, self.transform, self.at_least)
                if self.sample_seed is None:
                    yield decode()
                else:
                    seed = mix_seed(self.sample_seed, epoch, self.rank, worker, position)
                    yield seeded_sample(seed, decode)
            if not self.repeat:
                return
            epoch += 1


def read_shards(
    shards: Sequence[str], select_files: Callable[[str], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples from tar files, one shard at a time; a shard that cannot be opened or is
    cut short yields one `{BAD: ...}` entry naming it (its first error: the rest follow from
    it), and its readable samples still come through."""
    for shard in shards:
        errors: list[Exception] = []

        def keep_going(err: Exception, errors: list[Exception] = errors) -> bool:
            errors.append(err)
            return True

        reported = False
        samples = wds.tarfile_samples(
            [{"url": shard}], handler=keep_going, select_files=select_files
        )
        for position, raw in enumerate(itertools.chain(samples, [None])):
            if errors and not reported:
                reported = True
                reason = f"unreadable or cut-short shard ({_why(errors[0])})"
                yield {BAD: BadSample(shard, reason)}
            if raw is not None:
                raw["__position__"] = position  # two samples under one key stay two
                yield raw


class EpochLoader(DataLoader):
    """A DataLoader over a `ShardStream` that tells the stream which epoch it is, and, given
    `num_batches`, ends each epoch after that many batches (so DDP ranks stay in step). A
    run resumed mid-epoch reads and drops the `skip` batches it already trained on: a stream
    cannot seek, and reading is what keeps the order of an uninterrupted run."""

    def __init__(
        self,
        dataset: ShardStream,
        num_batches: int | None = None,
        epoch: int = 0,
        skip: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.num_batches, self.epoch, self.skip = num_batches, epoch, skip  # epoch: the next pass

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.epoch  # workers get a fresh copy of the dataset each epoch
        self.epoch += 1
        skip, self.skip = self.skip, 0
        if skip:
            log.info("resuming mid-epoch: reading past the %d batches already trained on", skip)
        return islice(super().__iter__(), skip, self.num_batches)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a stream of shards has no length; set data.epoch_samples")
        return self.num_batches


class WebDataModule(ImageDataModule):
    """Tar shards for training, validation and (optionally) testing, e.g.
    `data.train_shards='/data/laion/{00000..09999}.tar'`."""

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str],
        test_shards: str | Sequence[str] | None = None,
        shuffle_buffer: int = 1000,
        epoch_samples: int | None = None,
        vocab_shards: int | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if self.cache_features:
            self.feature_images("train")  # not for streams: raises, naming what is supported
        self.shards = {
            split: expand_shards(spec, f"data.{split}_shards")
            for split, spec in (("train", train_shards), ("val", val_shards), ("test", test_shards))
            if spec is not None
        }
        for name, value in (("shuffle_buffer", shuffle_buffer), ("epoch_samples", epoch_samples)):
            if value is not None and value < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {value}.")
        if not 0 <= seed < 2**63:
            raise ConfigError(f"data.seed must be in [0, 2**63), got {seed}.")
        if vocab_shards is not None and vocab_shards < 1:
            raise ConfigError(f"data.vocab_shards must be >= 1 or null (all), got {vocab_shards}.")
        self.shuffle_buffer, self.epoch_samples = shuffle_buffer, epoch_samples
        self.vocab_shards, self.seed = vocab_shards, seed

    def split_names(self) -> list[str]:
        return list(self.shards)

    def dataset(self, split: str, scan: bool = False) -> Dataset:
        check_shards(self.shards[split], f"data.{split}_shards")
        train = split == "train" and not scan
        return ShardStream(
            self.shards[split],
            self.image_transform(split, scan),
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            repeat=train and bool(self.epoch_samples),
            sample_seed=self.run_seed if train else None,
            at_least=self.decode_size(scan),
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        stream = self.split(split)
        assert isinstance(stream, ShardStream)
        if self.trainer is not None:  # under DDP: this process's share of the shards
            stream.rank, stream.world_size = self.trainer.global_rank, self.trainer.world_size
        if train and stream.world_size > 1 and not self.epoch_samples:
            raise ConfigError(
                "training on shards with several processes needs data.epoch_samples: without "
                "it ranks read different numbers of samples and the first to finish waits "
                "forever for the others."
            )
        if train and len(stream.shards) < stream.world_size:
            raise ConfigError(
                f"data.{split}_shards has {len(stream.shards)} shards for {stream.world_size} "
                "processes: every process needs at least one shard; split the data finer."
            )
        num_batches = None
        if train and self.epoch_samples:
            num_batches = max(1, self.epoch_samples // (stream.world_size * self.batch_size))
        epoch, skip = self.training_position() if train else (0, 0)
        if train:
            self.check_training_split(None, num_batches, skip)
        return EpochLoader(
            stream,
            num_batches,
            epoch,
            skip,
            batch_size=self.batch_size,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pins_memory(),
            collate_fn=self.collator(split, train),
        )

    def training_references(self) -> Iterator[list[str]]:
        shards = self.shards["train"][: self.vocab_shards]
        for raw in read_shards(shards, select_files=_is_caption_file):
            captions = [] if BAD in raw else sample_captions(raw)
            if isinstance(captions, list) and captions:  # bad ones: reported when training reads
                yield captions

    def training_cache_file(self, kind: str) -> Path | None:
        shards = self.shards["train"][: self.vocab_shards]
        check_shards(shards, "data.train_shards")
        local = [Path(s.removeprefix("file:")) for s in shards if not s.startswith(REMOTE_PREFIXES)]
        if len(local) < len(shards):
            return None  # remote shards: no folder of ours to cache into
        settings = {**tokenizer_settings(self.min_freq), "format": "webdataset"}
        key = data_key(local, settings, read_contents=False)
        return local[0].with_name(f"shards.{kind}-{key}.json")


def _is_caption_file(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in CAPTION_EXTENSIONS


def _why(err: Exception) -> str:
    """The readable part of a tar or file error (webdataset appends streams and URLs to it)."""
    text = next((a for a in err.args if isinstance(a, str)), type(err).__name__)
    return text.split(" @ ")[0]
