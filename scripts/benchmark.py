"""Speed: python scripts/benchmark.py [--model tiny] [--image-size 224] [--only data] [--json]

decoding: captions/second for greedy and beam-3 search at batch 1 and 32 (20 tokens each), and
the time per generated token at lengths 16, 32 and 64 with and without the KV cache.
data: images/second through the JSONL/COCO loader (COCO-sized JPEGs, per worker) next to the
model's training step at the same batch size.
For a randomly initialised model of a `conf/model/` preset; medians of repeated runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from captioner.benchmark import Throughput, cache_summary, data_benchmark, decoding_benchmark
from captioner.models import CaptionerConfig

ROOT = Path(__file__).resolve().parents[1]


def preset_config(name: str, image_size: int, vocab_size: int) -> CaptionerConfig:
    """The architecture of `model=<name>` at this image size, as training would build it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"data.image_size={image_size}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    keys = {field.name for field in dataclasses.fields(CaptionerConfig)}
    return CaptionerConfig(
        **{k: v for k, v in model.items() if k in keys},
        vocab_size=vocab_size,  # type: ignore[union-attr]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a preset in conf/model/")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--vocab-size", type=int, default=10_000, help="COCO-sized by default")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader processes")
    parser.add_argument("--only", choices=["decoding", "data"], help="run one part")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = preset_config(args.model, args.image_size, args.vocab_size)
    rows, summary, loading = [], {}, []
    if args.only in (None, "decoding"):
        rows = decoding_benchmark(config, batch_sizes=tuple(args.batch_sizes), repeats=args.repeats)
        summary = cache_summary(rows)
    if args.only in (None, "data"):
        loading = data_benchmark(config, workers=tuple(args.workers), repeats=args.repeats)
    setting = {
        "model": args.model, "image_size": args.image_size, "vocab_size": args.vocab_size,
        "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}",
    }  # fmt: skip
    if args.json:
        results = [dataclasses.asdict(row) for row in rows]
        data = [{**dataclasses.asdict(r), "per_worker": r.per_worker} for r in loading]
        report = {"setting": setting, "results": results, "summary": summary, "data": data}
        print(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(", ".join(f"{k}={v}" for k, v in setting.items()))
    if loading:
        print_loading(console, loading)
    if not rows:
        return
    table = Table(title="decoding (medians)")
    for column in ("measure", "strategy", "batch", "tokens", "cache", "value"):
        table.add_column(column, justify="left" if column in ("measure", "strategy") else "right")
    for r in rows:
        cache = "yes" if r.cache else "no"
        table.add_row(r.measure, r.strategy, str(r.batch), str(r.tokens), cache, f"{r.value:.2f}")
    console.print(table)
    for name, value in summary.items():
        console.print(f"{name}: {value:.2f}x")


def print_loading(console: Console, rows: list[Throughput]) -> None:
    """Loader and training rates, and how many workers keep the model fed."""
    table = Table(title="data loading vs training (medians, images/s)")
    for column in ("stage", "batch", "workers", "images/s", "per worker"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for r in rows:
        per_worker = f"{r.per_worker:.1f}" if r.stage == "loader" else ""
        table.add_row(r.stage, str(r.batch), str(r.workers), f"{r.images_per_s:.1f}", per_worker)
    console.print(table)
    train = next(r.images_per_s for r in rows if r.stage == "train step")
    one = next(r.per_worker for r in rows if r.stage == "loader")
    console.print(
        f"one loader process makes {one / train:.1f}x the images the training step consumes: "
        f"{math.ceil(train / one)} worker(s) keep it fed"
    )


if __name__ == "__main__":
    main()
