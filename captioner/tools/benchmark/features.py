"""Stored encoder outputs: training images/s with the encoder frozen, from COCO-sized JPEGs
through it and from its stored outputs (`data.cache_features`), `--steps` steps of
`--train-batch`, and the store's build rate and size per image."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from captioner.tools.benchmark.loading import write_photo_dataset
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.training import train


@dataclass
class FeatureSpeed:
    """Training with a frozen encoder: from the images through it, against from its stored
    outputs (`data.cache_features`), one model, the same COCO-sized JPEGs and steps."""

    live_images_per_s: float  # training steps fed images: the frozen encoder runs every step
    cached_images_per_s: float  # training steps fed the stored features
    live_seconds: float  # the whole fit (loading, steps), from images
    cached_seconds: float  # the whole fit from the store, its build left out
    store_images_per_s: float  # building the store: a decode and an encoder forward per image
    store_bytes_per_image: int

    @property
    def speedup(self) -> float:
        return self.cached_images_per_s / self.live_images_per_s


def feature_cache_speed(
    setting: Setting, folder: Path, steps: int = 12, batch_size: int = 32, workers: int = 2
) -> FeatureSpeed:
    """Two short trainings of the setting's model, its encoder frozen: from images, and with
    `data.cache_features`, building the store first."""
    annotations = write_photo_dataset(folder, steps * batch_size)
    args = setting.args
    common = [
        "data=jsonl", f"data.train_file={annotations}", f"data.val_file={annotations}",
        "data.min_freq=1", f"data.batch_size={batch_size}", f"data.num_workers={workers}",
        f"data.feature_dir={folder / 'features'}", "model.encoder.freeze=all",
        f"trainer.max_steps={steps}", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
        "test=false", "~logger", "~callbacks", "+trainer.enable_checkpointing=false",
        f"model={args.model}", f"data.image_size={args.image_size}", *args.overrides,
    ]  # fmt: skip
    runs = []
    for name, cached in (("live", False), ("cached", True)):
        cfg = setting.train_config([*common, f"data.cache_features={cached}"], folder / name)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the benchmark's report
            metrics, objects = train(cfg)
        runs.append((metrics, objects["datamodule"]))
    (live, _), (cached_run, data) = runs
    store, build = data.features, data.feature_seconds
    return FeatureSpeed(
        live["train/images_per_s"], cached_run["train/images_per_s"], live["train/seconds"],
        cached_run["train/seconds"] - build, store.rows / build, store.nbytes_per_row(),
    )  # fmt: skip


def _run(setting: Setting) -> list[FeatureSpeed]:
    with tempfile.TemporaryDirectory() as folder:
        args = setting.args
        return [feature_cache_speed(setting, Path(folder), args.steps, args.train_batch)]


def _show(console: Console, rows: list[FeatureSpeed], _: dict[str, list[Any]]) -> None:
    (row,) = rows
    out = table(
        "Training with the encoder frozen: images through it, or its stored outputs",
        ("", "train images/s", "fit seconds"),
    )
    out.add_row("from images", f"{row.live_images_per_s:.1f}", f"{row.live_seconds:.1f}")
    out.add_row("from the store", f"{row.cached_images_per_s:.1f}", f"{row.cached_seconds:.1f}")
    console.print(out)
    console.print(
        f"stored features are {row.speedup:.1f}x faster per training step; the store took "
        f"{row.store_images_per_s:.1f} images/s to build, {row.store_bytes_per_image / 1024:.0f} "
        "KiB per image (float16)"
    )


def _report(rows: list[FeatureSpeed]) -> dict[str, Any]:
    return {"features": (rows and {**asdict(rows[0]), "speedup": rows[0].speedup}) or None}


SUITE = Suite("features", _run, _show, _report, cpu_only=True)
