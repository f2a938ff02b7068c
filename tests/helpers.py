"""What the tests share (fixtures live in `conftest.py`): tiny models and composed configs, tiny
datasets in every supported format written on the fly with real image files and tars, callbacks
that record what each process of a distributed run did, and the scripts run as a user runs them.

Images are shapes scenes, so the captions describe them; the test split carries the word
"zebra", which must never reach the vocabulary (it is built from training captions only).
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from omegaconf import DictConfig
from PIL import Image

from captioner.cli.config import CONF_DIR, compose_config
from captioner.core.errors import DataError
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.data import ShapesWorld

# --- models and configs -----------------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]  # the repository
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
# A model small enough that a few steps take a second; every run writes under tmp_path.
TINY = (*TINY_IMAGE_MODEL, "data.batch_size=4", "data.num_workers=0", *QUIET)
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_train(*overrides: str, output_dir: Path, config_name: str = "train") -> DictConfig:
    """The config `scripts/train.py` (or another script's) would run, writing everything
    under `output_dir`."""
    return compose_config(config_name, overrides, output_dir)


def tiny_config(decoder: str = "cross", cross_every: int = 1, **changes: object) -> CaptionerConfig:
    """A tiny non-square model's config; `changes` in the flat names of the first checkpoint
    format (`encoder_dim`, `decoder_depth`, ...) or as `encoder.key` / `decoder.key` for the
    newer keys, `decoder` the decoder's kind."""
    values: dict = dict(
        vocab_size=23, image_size=(16, 24), patch_size=4, encoder_dim=32, encoder_depth=2,
        encoder_heads=4, decoder_dim=24, decoder_depth=2, decoder_heads=2, max_len=12,
    )  # fmt: skip
    nested = {key: changes.pop(key) for key in list(changes) if "." in key}
    values.update(changes)
    config = CaptionerConfig.from_dict(values)
    config.decoder.kind, config.decoder.cross_every = decoder, cross_every
    for key, value in nested.items():
        part, name = key.split(".")
        setattr(getattr(config, part), name, value)
    config.validate()
    return config


# The ways a decoder reads the image: every invariant of a caption decoder holds for each.
# Attention variants: 4 decoder heads over 1 (MQA) or 2 (GQA) key/value heads, rotary word
# positions and 2-D rotary patch positions.
_MQA_ROPE = {
    "decoder_heads": 4, "decoder.kv_heads": 1, "decoder.pos_embed": "rope",
    "encoder.kv_heads": 1, "encoder.pos_embed": "rope",
}  # fmt: skip
_GQA_ROPE = {**_MQA_ROPE, "decoder.kv_heads": 2, "encoder.kv_heads": 2}
FUSIONS = {
    "cross": {}, "cross_every_2": {"cross_every": 2}, "prefix": {"decoder": "prefix"},
    "cross_mqa_rope": _MQA_ROPE, "prefix_gqa_rope": {"decoder": "prefix", **_GQA_ROPE},
}  # fmt: skip


def open_gates(model: CaptionerModel, value: float = 0.5) -> CaptionerModel:
    """Gated cross-attention starts shut (tanh(0) = 0), blind to the image; open it as
    training would, so that tests of what the image changes can see it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("cross_gate"):
                param.fill_(value)
    return model


# --- datasets, written on the fly -------------------------------------------------------------


SPLIT_SIZES = {"train": 8, "val": 4, "test": 4}
TEST_ONLY_WORD = "zebra"


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


def scene(i: int) -> Image.Image:
    world = ShapesWorld(image_size=(32, 48), max_objects=2)
    return Image.fromarray(world.render(world.scene("test", i)))


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


def data_overrides(fmt: str, paths: dict) -> list[str]:
    config = "jsonl" if fmt == "csv" else fmt
    # quoted, as on a shell command line: brace patterns are Hydra syntax otherwise
    return [f"data={config}", *(f"data.{key}='{value}'" for key, value in paths.items())]


def data_error(call: Callable[[], object], *fragments: str) -> str:
    """The message of the `DataError` that `call` raises, checked to contain every fragment."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


IMAGES = ({"id": 9, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"})
ANNOTATIONS = (
    {"image_id": 3, "caption": " A cat. ", "id": 1},
    {"image_id": 9, "caption": "A dog."},
    {"image_id": 3, "caption": "A cat sits.\n"},
)


def coco(
    images: Sequence[Any] = IMAGES, annotations: Sequence[Any] = ANNOTATIONS
) -> dict[str, Any]:
    return {"info": {}, "images": list(images), "annotations": list(annotations)}


# --- captions for the metrics -----------------------------------------------------------------


_SUBJECTS = [
    "a man", "A woman", "two dogs", "The cat", "a group of people", "A young boy", "an elephant",
    "three giraffes", "A baseball player", "a little girl", "the kids", "Someone", "a chef",
    "An old man's dog", "a surfer", "The bus driver", "a plate of food", "A black-and-white cow",
]  # fmt: skip
_VERBS = [
    "riding", "sitting on", "standing next to", "holding", "eating", "looking at", "playing with",
    "walking down", "is flying", "carrying", "leaning against", "cutting", "parked near",
]  # fmt: skip
_OBJECTS = [
    "a wave", "a red and white surfboard", "the bench", "a hot-dog", "a slice of pizza",
    "an old, rusty bike", "a frisbee", "the kite", "a large pizza", "some broccoli",
    "a toothbrush", "the traffic light", "a laptop computer", "a 3-year-old's toy",
]  # fmt: skip
_PLACES = [
    "on a beach", "in the park", "near the water's edge", "at night", "in a kitchen",
    "on top of a table", "down the street", "", "", "in front of a building",
]  # fmt: skip
# Captions a tokenizer could trip on, each kind the COCO data has: punctuation, quotes,
# contractions, possessives, hyphens, numbers, brackets, slashes, ampersands, non-ASCII text,
# blanks, abbreviations, capitals.
HARD_CAPTIONS = [
    "A man, a plan; a canal: Panama!", "Is this a dog?", "Wow!!! What a view?!", "a cat... asleep",
    "a cat . . . asleep", "dog - cat", "dog -- cat", "dog --- cat", "dog—cat", "dog – cat",
    'A sign that says "STOP".', "A sign reading 'no parking' here", "“Fancy” quotes", '"Quoted"',
    "‘single’ quotes", "The word ''hi''", "`back` ticks", "«guillemets»", "It's a dog", "don't",
    "I can't, won't and shouldn't", "I'm sure they're here and we've seen he'll go; she'd know",
    "it isn't", "DOESN'T", "y'all", "five o'clock", "yes ma'am", "rock 'n' roll", "the '90s",
    "gonna go", "we cannot", "wanna play", "'Tis the season", "the dog's bone", "the dogs' bones",
    "James' car", "children's toys", "a women's restroom", "McDonald's sign", "the boss’s desk",
    "a black-and-white photo", "a 3-year-old child", "a t-shirt", "an x-ray", "well-known",
    "anti-theft device", "co-op", "1,000 people", "3.5 inches", "$5.99 each", "at 10:30 am",
    "1/2 a sandwich", "1 1/2 cups", "the #1 fan", "50% off", "2nd place", "1990s cars",
    "on 12-1-2013", "call 555-1234", "(555) 123-4567", "a dog (brown) sits", "[sic] text",
    "{braces}", "(left) and (right)", "black/white", "and/or", "w/ a hat", "open 24/7",
    "a tv/dvd combo", "AT&T store", "R&B", "salt & pepper", "Q&A", "fish &amp; chips", "café",
    "a crème brûlée", "naïve", "jalapeño", "Zürich", "em—dash", "an ellipsis…", "75°F",
    "2×4 board", "½ cup", "€5", "£10", "Straße", "Москва", "東京 tower", "a dog 🐶 runs",
    "  a  dog  ", "a\tdog", "\ta dog\t", "a dog .", "A dog.", "A DOG RUNNING ON THE BEACH.",
    "THE U.S. FLAG", "I CAN'T", "Mr. Smith", "a U.S. flag", "St. Louis", "Dr. Who", "toys etc.",
    "e.g. a cat", "i.e. that one", "cats vs. dogs", "the letter A.", "Plan B.", "I.", "No. 5",
    "fig. 3", "Jan. 5", "Co. Ltd", "www.example.com", "visit google.com", "me@example.com",
    "#hashtag", "@user", "smile :)", "a:b", "x=y", "a+b", "a*b", "~ish", "1.5m tall", "the 1st.",
    "a 2.", "...", "", "   ", ".", "A", "a sign: 'Beware of dog'", "ok.", "Jr.", "5'6\" tall",
    "c++ code", "C# code", "<b>bold</b>", "a < b > c", "^_^", "ready?no", "dog.cat", "x_y",
]  # fmt: skip


def _coco_like(rng: random.Random) -> str:
    """A COCO-style sentence with the casing, spacing and full stops annotators leave."""
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)]
    text = " ".join(w for w in words if w)
    if rng.random() < 0.5:
        text += rng.choice([".", " .", "!", "..."])
    if rng.random() < 0.1:
        text = text.upper()
    if rng.random() < 0.1:
        text = rng.choice(["  ", "\t", " "]) + text.replace(" ", rng.choice(["  ", " \t"]), 1)
    return text


def caption_sets(count: int, seed: int = 0) -> dict[int, list[str]]:
    """Five captions an image: COCO-like sentences, with the hard captions mixed in."""
    rng = random.Random(seed)
    hard = iter(HARD_CAPTIONS)
    sets = {image: [_coco_like(rng) for _ in range(5)] for image in range(count)}
    for group, caption in zip(sets.values(), hard, strict=False):
        group[2] = caption
    return sets


# --- the scripts, run as a user runs them -----------------------------------------------------


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def run_caption(*args: Any, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "caption.py"), *map(os.fsencode, map(str, args))],
        cwd=cwd, capture_output=True, timeout=600,
    )  # fmt: skip


def train_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`scripts/train.py` as a user runs it, with every default folder under `cwd`, and the
    test helpers importable (by this process and the DDP processes Lightning starts from it)."""
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "CAPTIONER_ROOT": str(cwd / "root"),
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


# Two gloo processes, a few steps of a tiny model, validation at steps 2 and 4.
DDP_RUN = (
    "trainer=ddp_sim", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "callbacks.attention_samples=null", "callbacks.rich_progress_bar=null",
    "+callbacks.probe._target_=tests.helpers.DistributedProbe",
)  # fmt: skip


# --- callbacks that record or disturb a run ---------------------------------------------------


class DistributedProbe(Callback):
    """What one process of a DDP run did, written to `probe_rank<r>.json` in the run folder when
    it exits: the image ids it trained on, the ids of its last validation and of its test per
    split, the metrics and best checkpoint it ended with, the captions it holds, and every file
    it opened for writing in the run folder and every Java process it started (audit hooks see
    both, whatever the code that does it). Given to `scripts/train.py` as
    `+callbacks.probe._target_=tests.helpers.DistributedProbe`.
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
