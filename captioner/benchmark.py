"""Decoding and data-loading speed, measured side by side in one process.

Every figure is the median of `repeats` timed runs after one warm-up run, the runs of what is
compared taking turns. Models are randomly initialised; decoding lengths are fixed
(`min_length = max_length`), so a random model decodes exactly as many tokens as asked.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captioner.data import TableDataModule
from captioner.generation import DecodingOptions, generate
from captioner.models import CaptionerConfig, CaptionerModel

BOS, EOS, PAD = 1, 2, 0
K = TypeVar("K", bound=Hashable)


@dataclass
class Measurement:
    """One line of the report."""

    measure: str  # "captions/s" or "ms/token"
    strategy: str  # "greedy" or "beam-3"
    batch: int  # images decoded together
    tokens: int  # tokens generated per caption
    cache: bool  # decoded with the KV cache
    value: float


def median_seconds(functions: dict[K, Callable[[], object]], repeats: int) -> dict[K, float]:
    """Median wall time of each function over `repeats` rounds, after one warm-up round.

    The functions take turns within every round, so a slow spell of a shared machine falls on
    all of them alike and the ratios between them stay fair.
    """
    times: dict[K, list[float]] = {key: [] for key in functions}
    for round_ in range(repeats + 1):
        for key, function in functions.items():
            start = time.perf_counter()
            function()
            if round_:  # round 0 warms up
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def _decode(model: CaptionerModel, images: torch.Tensor, **options: object) -> Callable[[], object]:
    opts = DecodingOptions(**options)  # type: ignore[arg-type]
    return lambda: generate(model, images, BOS, EOS, PAD, opts)


def decoding_benchmark(
    config: CaptionerConfig,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    caption_tokens: int = 20,
    lengths: tuple[int, ...] = (16, 32, 64),
    repeats: int = 7,
) -> list[Measurement]:
    """Captions/second for greedy and beam-3 search, and the time per generated token at
    several caption lengths with and without the KV cache.

    Time per token leaves out the image encoder: it is timed alone and subtracted, so the
    figure is what one more word costs.
    """
    config = replace(config, max_len=max(max(lengths), caption_tokens) + 1)
    torch.manual_seed(0)
    model = CaptionerModel(config).eval()
    rows: list[Measurement] = []
    for batch in batch_sizes:
        images = torch.randn(batch, config.in_channels, *config.image_size)
        fixed = {"min_length": caption_tokens, "max_length": caption_tokens}
        searches = {"greedy": 1, "beam-3": 3}
        timed = median_seconds(
            {name: _decode(model, images, beam_size=k, **fixed) for name, k in searches.items()},
            repeats,
        )
        for name, seconds in timed.items():
            rows.append(
                Measurement("captions/s", name, batch, caption_tokens, True, batch / seconds)
            )
    for batch in batch_sizes:
        images = torch.randn(batch, config.in_channels, *config.image_size)
        functions: dict[tuple[int, bool] | str, Callable[[], object]] = {
            (length, cached): _decode(
                model, images, min_length=length, max_length=length, use_cache=cached
            )
            for length in lengths
            for cached in (True, False)
        }
        functions["encoder"] = lambda images=images: _encode(model, images)
        timed = median_seconds(functions, repeats)
        for key, seconds in timed.items():
            if isinstance(key, tuple):
                length, cached = key
                ms = 1000 * (seconds - timed["encoder"]) / length
                rows.append(Measurement("ms/token", "greedy", batch, length, cached, ms))
    return rows


@torch.no_grad()
def _encode(model: CaptionerModel, images: torch.Tensor) -> torch.Tensor:
    return model.encoder(images)[0]


def cache_summary(rows: list[Measurement]) -> dict[str, float]:
    """Per batch size: how flat the cached cost per token is (longest length over shortest),
    and how much faster cached decoding is than recomputation at each length."""
    per_token = {(r.batch, r.tokens, r.cache): r.value for r in rows if r.measure == "ms/token"}
    lengths = sorted({tokens for _, tokens, _ in per_token})
    out = {}
    for batch in sorted({batch for batch, _, _ in per_token}):
        short, long = per_token[batch, lengths[0], True], per_token[batch, lengths[-1], True]
        out[f"batch {batch}: cached ms/token, length {lengths[-1]} / {lengths[0]}"] = long / short
        for length in lengths:
            speedup = per_token[batch, length, False] / per_token[batch, length, True]
            out[f"batch {batch}: cache speed-up, {length} tokens"] = speedup
    return out


@dataclass
class Throughput:
    """Images per second through one stage of training."""

    stage: str  # "loader" (read, decode, augment, collate) or "train step" (fwd+bwd+AdamW)
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
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / name, quality=90)
        lines.append(json.dumps({"image": name, "caption": f"a photo with number {index}"}))
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def data_benchmark(
    config: CaptionerConfig,
    *,
    batch_size: int = 32,
    workers: tuple[int, ...] = (0, 2),
    num_images: int = 256,
    caption_tokens: int = 16,
    repeats: int = 3,
) -> list[Throughput]:
    """The JSONL loader (the path COCO, Karpathy and Flickr share) on COCO-sized JPEGs at the
    model's image size, next to the model's training step on the same batch size: loading is
    not the bottleneck while workers x images/s per worker exceeds the training rate."""
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
            rows.append(Throughput("loader", batch_size, count, images / seconds["epoch"]))
    torch.manual_seed(0)
    model = CaptionerModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, config.in_channels, *config.image_size)
    tokens = torch.randint(4, config.vocab_size, (batch_size, caption_tokens + 1))

    def step() -> None:
        logits = model(images, tokens[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_seconds({"step": step}, repeats)["step"]
    rows.append(Throughput("train step", batch_size, 0, batch_size / seconds))
    return rows
