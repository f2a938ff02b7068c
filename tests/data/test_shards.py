"""WebDataset shards: each sample once per epoch, split across ranks then workers, bad samples
under both policies."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from captioner.core.errors import ConfigError, DataError
from tests.helpers import (
    image_bytes,
    scenes,
    write_shards,
    write_tar,
)


def shard_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["image_ids"]]


def test_shards_each_sample_once_per_epoch_with_two_workers(tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    train = write_shards(tmp_path, "train", shards=5, per_shard=4)
    val = write_shards(tmp_path, "val", shards=2, per_shard=3)
    dm = WebDataModule(train, val, image_size=32, batch_size=2, num_workers=2, min_freq=1,
                       shuffle_buffer=4, augment=False)  # fmt: skip
    loader = dm.train_dataloader()
    epochs = [shard_keys(loader) for _ in range(3)]
    expected = sorted(f"{s:05d}{k:04d}" for s in range(5) for k in range(4))
    for keys in epochs:
        assert sorted(keys) == expected  # every sample once, none twice, across both workers
    assert len({tuple(keys) for keys in epochs}) == 3  # a new order each epoch
    val_loader = dm.val_dataloader()
    assert shard_keys(val_loader) == shard_keys(val_loader)  # validation: fixed order
    assert sorted(shard_keys(val_loader)) == sorted(
        f"{s:05d}{k:04d}" for s in range(2) for k in range(3)
    )


def test_shards_are_split_across_ranks_then_workers(tmp_path: Path) -> None:
    from captioner.data.shards import assign_shards

    shards = [f"s{i}" for i in range(10)]
    parts = [assign_shards(shards, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(s for part in parts for s in part) == sorted(shards)
    assert parts[0] == ["s0", "s4", "s8"] and parts[3] == ["s3", "s7"]


def test_epoch_samples_gives_every_rank_the_same_number_of_batches(tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    train = write_shards(tmp_path, "train", shards=3, per_shard=4)  # ranks get 8 and 4 samples
    counts = []
    for rank in range(2):
        dm = WebDataModule(train, train, image_size=32, batch_size=2, num_workers=0,
                           min_freq=1, epoch_samples=16)  # fmt: skip
        dm.split("train").rank, dm.split("train").world_size = rank, 2
        loader = dm.train_dataloader()
        counts.append([len(loader), len(list(loader))])
    assert counts == [[4, 4], [4, 4]]  # 16 samples / 2 ranks / batch 2, shards repeated as needed


def bad_shard(root: Path, case: str) -> tuple[str, str]:
    """One good sample, then a sample broken as `case` says, in a shard; returns (shard
    pattern, the text that names the bad one)."""
    (image, captions), _ = scenes("train", 2)
    good = [("good.jpg", image_bytes(image)), ("good.txt", captions[0].encode())]
    broken = {
        "corrupt": [("bad.jpg", b"not an image"), ("bad.txt", b"a caption")],
        "empty_caption": [("bad.jpg", image_bytes(image)), ("bad.txt", b"  \n")],
        "no_caption": [("bad.jpg", image_bytes(image))],
        "bomb": [("bad.png", image_bytes(Image.new("1", (20_000, 20_000)), "PNG")),
                 ("bad.txt", b"a caption")],
    }[case]  # fmt: skip
    shard = write_tar(root / "bad-00000.tar", good + broken)
    return str(shard), f"{shard}/bad"


@pytest.mark.parametrize("case", ["corrupt", "empty_caption", "no_caption", "bomb", "cut_short"])
def test_bad_samples_in_shards_under_both_policies(case: str, tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    if case == "cut_short":  # a shard that ends in the middle of a member
        full = Path(write_shards(tmp_path, "train", 1, 3).replace("{00000..00000}", "00000"))
        full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        shards, named = str(full), str(full)
    else:
        shards, named = bad_shard(tmp_path, case)
    for policy in ("skip", "error"):
        dm = WebDataModule(shards, shards, image_size=32, batch_size=4, num_workers=0,
                           min_freq=1, on_bad_sample=policy)  # fmt: skip
        batches = list(dm.val_dataloader())
        assert len(batches) == 1 and len(batches[0]["bad_samples"]) == 1
        if policy == "error":
            with pytest.raises(DataError, match="data.on_bad_sample=skip") as err:
                dm.transfer_batch_to_device(batches[0], torch.device("cpu"), 0)
            assert named in str(err.value)
        else:
            batch = dm.transfer_batch_to_device(batches[0], torch.device("cpu"), 0)
            assert len(dm.bad_samples) == 1 and named in next(iter(dm.bad_samples.skipped))
            assert len(batch["image_ids"]) >= 1  # the good samples still arrive


def test_a_worker_without_shards_ends_instead_of_spinning(tmp_path: Path) -> None:
    from captioner.data.shards import ShardStream

    shards = write_shards(tmp_path, "train", 2, 2)
    stream = ShardStream([shards.replace("{00000..00001}", f"{i:05d}") for i in range(2)],
                         lambda image: image, shuffle=True, repeat=True)  # fmt: skip
    stream.rank, stream.world_size = 2, 3  # a third process: no shard is left for it
    result: list = []
    thread = threading.Thread(target=lambda: result.append(list(stream)), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert result == [[]]  # it finished, with nothing, instead of looping forever


def test_shards_under_ddp_need_epoch_samples(tmp_path: Path) -> None:
    from captioner.data import WebDataModule

    shards = write_shards(tmp_path, "train", 2, 2)
    dm = WebDataModule(shards, shards, image_size=32, num_workers=0, min_freq=1)
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=0, strategy=cpu)
    with pytest.raises(ConfigError, match="data.epoch_samples"):
        dm.train_dataloader()
