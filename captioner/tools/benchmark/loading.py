"""Data loading: images/s through the JSONL loader (the path COCO, Karpathy and Flickr share),
from COCO-sized JPEGs at the model's image size, per number of loader processes."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console

from captioner.core.files import atomic_write, write_text
from captioner.core.models import CaptionerConfig
from captioner.data import TableDataModule
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.tools.benchmark.timing import median_seconds


@dataclass
class Throughput:
    """Images per second through the loader."""

    batch: int
    workers: int  # loader processes (0: the main process does the loading)
    images_per_s: float

    @property
    def per_worker(self) -> float:
        return self.images_per_s / max(self.workers, 1)


def write_photo_dataset(folder: Path, count: int, size: tuple[int, int] = (480, 640)) -> Path:
    """`count` COCO-sized JPEGs (smooth colour fields with fine noise, compressing like photos)
    and a JSONL file naming them; returns the JSONL path."""
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size[::-1], Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (*size, 3))
        name = f"{index:05d}.jpg"
        with atomic_write(folder / name) as file:
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(file, "JPEG", quality=90)
        lines.append(json.dumps({"image": name, "caption": f"a photo with number {index}"}))
    return write_text(folder / "captions.jsonl", "\n".join(lines) + "\n")


def data_benchmark(
    config: CaptionerConfig,
    *,
    batch_size: int = 64,
    workers: tuple[int, ...] = (0, 2),
    num_images: int = 256,
    repeats: int = 3,
) -> list[Throughput]:
    """The JSONL loader on COCO-sized JPEGs at the model's image size: loading is not the
    bottleneck while workers x images/s per worker exceeds the training rate."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        annotations = write_photo_dataset(Path(tmp), num_images)
        for count in workers:
            datamodule = TableDataModule(
                str(annotations), str(annotations), image_size=list(config.image_size),
                batch_size=batch_size, num_workers=count, min_freq=1,
            )  # fmt: skip
            loader = datamodule.train_dataloader()
            seconds = median_seconds({"epoch": lambda loader=loader: list(loader)}, repeats)
            images = len(loader) * batch_size
            rows.append(Throughput(batch_size, count, images / seconds["epoch"]))
    return rows


def _run(setting: Setting) -> list[Throughput]:
    args = setting.args
    return data_benchmark(
        setting.config, batch_size=args.train_batch, workers=tuple(args.workers), repeats=3
    )


def _show(console: Console, rows: list[Throughput], results: dict[str, list[Any]]) -> None:
    """Loader rates, and how many workers keep our fp32 training step fed."""
    out = table(
        f"data loading, batch {rows[0].batch} (medians, images/s)",
        ("workers", "images/s", "per worker"),
    )
    for r in rows:
        out.add_row(str(r.workers), f"{r.images_per_s:.1f}", f"{r.per_worker:.1f}")
    console.print(out)
    training = results.get("training", [])
    train = next((r.images_per_s for r in training if r.model == "captioner"), None)
    if train is not None:
        one = rows[0].per_worker
        console.print(
            f"one loader process makes {one / train:.1f}x the images our training step consumes "
            f"({train:.1f}/s): {math.ceil(train / one)} worker(s) keep it fed"
        )


def _report(rows: list[Throughput]) -> dict[str, Any]:
    return {"data": [{**asdict(r), "per_worker": r.per_worker} for r in rows]}


SUITE = Suite("data", _run, _show, _report, default=True, cpu_only=True)
