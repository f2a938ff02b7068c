"""Tiny datasets in every supported format, written on the fly with real image files and tars,
and a callback that records what each process of a distributed run did.

Images are shapes scenes, so the captions describe them; the test split carries the word
"zebra", which must never reach the vocabulary (it is built from training captions only).
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import os
import signal
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from PIL import Image

from captioner.data import ShapesWorld

SPLIT_SIZES = {"train": 8, "val": 4, "test": 4}
TEST_ONLY_WORD = "zebra"


# overrides for a model small enough to train in seconds on 32 px images
TINY_IMAGE_MODEL = (
    "model=tiny", "model.encoder.patch_size=8", "model.encoder.dim=32", "model.encoder.depth=1",
    "model.encoder.heads=2", "model.decoder.dim=32", "model.decoder.depth=1",
    "model.decoder.heads=2", "data.image_size=32", "data.min_freq=1",
)  # fmt: skip
# overrides that keep a training run quiet: no progress bar, figures, learning-rate log or logger
QUIET = (
    "callbacks.attention_samples=null", "callbacks.rich_progress_bar=null",
    "callbacks.lr_monitor=null", "~logger",
)  # fmt: skip


def scenes(split: str, count: int, size: int = 32) -> list[tuple[Image.Image, list[str]]]:
    world = ShapesWorld(image_size=size, captions_per_image=3, max_objects=2)
    out = []
    for index in range(count):
        scene = world.scene(split, index)
        captions = list(scene.captions)
        if split == "test":
            captions[-1] += f" near a {TEST_ONLY_WORD}"
        out.append((Image.fromarray(world.render(scene)), captions))
    return out


def image_bytes(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_coco(root: Path, sizes: dict[str, int] = SPLIT_SIZES) -> dict[str, Path]:
    """COCO captions files + one image folder; keys as in conf/data/coco.yaml."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    paths = {"image_dir": images_dir}
    next_id = 1
    for split, count in sizes.items():
        images, annotations = [], []
        for image, captions in scenes(split, count):
            name = f"{split}_{next_id:04d}.jpg"
            image.save(images_dir / name)
            images.append({"id": next_id, "file_name": name, "height": 32, "width": 32})
            annotations += [
                {"id": len(annotations) + 1000 * next_id, "image_id": next_id, "caption": c}
                for c in captions
            ]
            next_id += 1
        path = root / f"captions_{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations}))
        paths[f"{split}_json"] = path
    return paths


def write_karpathy(root: Path) -> dict[str, Path]:
    """dataset_coco.json with COCO-style train2014/val2014 folders and a restval split."""
    entries = []
    splits = {"train": "train", "restval": "train", "val": "val", "test": "test"}
    for karpathy_split, source in splits.items():
        folder = "train2014" if source == "train" else "val2014"
        (root / folder).mkdir(parents=True, exist_ok=True)
        count = SPLIT_SIZES[source] // (2 if source == "train" else 1)
        for image, captions in scenes(source, count):
            cocoid = len(entries) + 1
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            image.save(root / folder / name)
            sentences = [{"raw": c, "tokens": c.split()} for c in captions]
            entries.append(
                {"filepath": folder, "filename": name, "split": karpathy_split,
                 "sentences": sentences, "cocoid": cocoid, "imgid": cocoid - 1}
            )  # fmt: skip
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return {"split_file": path, "image_root": root}


def write_flickr(root: Path) -> dict[str, Path]:
    """Flickr8k layout: Flickr8k.token.txt, per-split image lists, one image folder."""
    images_dir = root / "Flicker8k_Dataset"
    images_dir.mkdir(parents=True)
    lines, paths = [], {"image_dir": images_dir}
    for split, count in SPLIT_SIZES.items():
        names = []
        for index, (image, captions) in enumerate(scenes(split, count)):
            name = f"{1000 + index}_{split}.jpg"
            image.save(images_dir / name)
            names.append(name)
            lines += [f"{name}#{k}\t{c}" for k, c in enumerate(captions)]
        listing = root / f"Flickr_8k.{split}Images.txt"
        listing.write_text("\n".join(names) + "\n")
        paths[f"{split}_list"] = listing
    paths["captions_file"] = root / "Flickr8k.token.txt"
    paths["captions_file"].write_text("\n".join(lines) + "\n")
    return paths


def write_table(root: Path, suffix: str = ".jsonl") -> dict[str, Path]:
    """Your-own-data files: JSONL records (a list of captions) or CSV rows (one per caption),
    with image paths relative to the annotation file."""
    (root / "pics").mkdir(parents=True)
    paths = {}
    for split, count in SPLIT_SIZES.items():
        rows = []
        for index, (image, captions) in enumerate(scenes(split, count)):
            name = f"pics/{split}{index}.png"
            image.save(root / name)
            rows.append({"image": name, "caption": captions})
        path = root / f"{split}{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["image", "caption"])
                writer.writerows([row["image"], c] for row in rows for c in row["caption"])
        paths[f"{split}_file"] = path
    return paths


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(root: Path, split: str, shards: int, per_shard: int) -> str:
    """img2dataset-style shards `{split}-0000N.tar` of jpg + txt + json samples (the json
    holding every reference); returns the brace pattern naming them."""
    root.mkdir(parents=True, exist_ok=True)
    samples = iter(scenes(split, shards * per_shard))
    for shard in range(shards):
        members = []
        for k in range(per_shard):
            image, captions = next(samples)
            key = f"{shard:05d}{k:04d}"
            members += [
                (f"{key}.jpg", image_bytes(image)),
                (f"{key}.txt", captions[0].encode()),
                (f"{key}.json", json.dumps({"caption": captions, "key": key}).encode()),
            ]
        write_tar(root / f"{split}-{shard:05d}.tar", members)
    return str(root / f"{split}-{{00000..{shards - 1:05d}}}.tar")


def write_webdataset(root: Path) -> dict[str, str]:
    return {
        "train_shards": write_shards(root, "train", 2, 4),
        "val_shards": write_shards(root, "val", 1, 4),
        "test_shards": write_shards(root, "test", 1, 4),
    }


class DistributedProbe(Callback):
    """What one process of a DDP run did, written to `probe_rank<r>.json` in the run folder when
    it exits: the image ids it trained on, the ids of its last validation and of its test per
    split, the metrics and best checkpoint it ended with, the captions it holds, and every file
    it opened for writing in the run folder and every Java process it started (audit hooks see
    both, whatever the code that does it). Given to `scripts/train.py` as
    `+callbacks.probe._target_=builders.DistributedProbe`.
    """

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"train": [], "val": {}, "test": {}, "writes": [], "java": 0}
        self.rank: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.rank is not None:  # set up again for the test
            return
        self.rank, self.folder = trainer.global_rank, Path(trainer.default_root_dir).resolve()
        self.path = self.folder / f"probe_rank{self.rank}.json"
        sys.addaudithook(self._audit)
        atexit.register(lambda: self.path.write_text(json.dumps(self.record)))

    def _audit(self, event: str, args: tuple) -> None:
        if event == "subprocess.Popen" and "java" in str(args[0]):
            self.record["java"] += 1
        if event == "open" and isinstance(args[0], str | Path):
            mode, flags = args[1], args[2]
            if any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR):
                self._wrote(args[0])
        elif event in ("os.rename", "os.link", "os.symlink"):  # a file written elsewhere, moved in
            self._wrote(args[1])

    def _wrote(self, name: str | Path) -> None:
        path = Path(name).resolve()
        if path != self.path and path.is_relative_to(self.folder):
            self.record["writes"].append(path.relative_to(self.folder).as_posix())

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.record["train"] += list(batch["image_ids"])

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["val"] = {}

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, *args: int
    ) -> None:
        if not trainer.sanity_checking:
            self.record["val"].setdefault(batch["split"], []).extend(batch["image_ids"])

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, *args: int
    ) -> None:
        self.record["test"].setdefault(batch["split"], []).extend(batch["image_ids"])

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.record["best"] = trainer.checkpoint_callback.best_model_path
        self.record["predictions"] = {s: sorted(p) for s, p in pl_module.predictions.items()}


class StepProbe(Callback):
    """Appends the run (a probe's own id), global step and image ids of every training batch to
    `steps.txt` in the run folder (a JSON object a line); at `pause_at_step` stops there for
    good (writing `paused`), for a test to kill it; at `fail_at_step` raises `Interrupted`; at
    `sigterm_at_step` sends its own process SIGTERM, as a scheduler about to pre-empt it would.
    """

    def __init__(
        self,
        pause_at_step: int | None = None,
        fail_at_step: int | None = None,
        sigterm_at_step: int | None = None,
    ) -> None:
        self.pause_at_step, self.fail_at_step = pause_at_step, fail_at_step
        self.sigterm_at_step = sigterm_at_step
        self.run = uuid.uuid4().hex

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if trainer.global_step == self.fail_at_step:
            raise Interrupted(f"stopped at step {trainer.global_step}")
        with open(folder / "steps.txt", "a") as file:
            step = {"run": self.run, "step": trainer.global_step, "images": batch["image_ids"]}
            file.write(json.dumps(step) + "\n")
        if trainer.global_step == self.pause_at_step:
            (folder / "paused").write_text("")
            time.sleep(3600)
        if trainer.global_step == self.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped on purpose, standing in for a crash."""


class Poison(Callback):
    """Makes training numbers non-finite at global step `step`: the batch's images (so the
    loss) with `what="loss"`, one weight's gradient with `what="gradient"`."""

    def __init__(self, step: int, what: str = "loss") -> None:
        self.step, self.what = step, what

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.what == "loss" and trainer.global_step == self.step:
            batch["images"].fill_(float("nan"))

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.what == "gradient" and trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("inf")
