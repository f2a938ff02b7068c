"""Speed, ours next to Hugging Face's: python scripts/benchmark.py [--model tiny] [--image-size 64]
[--only training|generation|decoding|data|fusion|variants] [--device cuda] [--no-hf] [--json]
[KEY=VALUE ...]

training: images/s of a training step (forward, backward, AdamW) in fp32 and under bf16
autocast, for our model and for Hugging Face's VisionEncoderDecoderModel of the same
architecture, with model FLOPs utilisation against this machine's matmul peak, measured here.
generation: captions/s, greedy and beam 3, 20 tokens each, at batch 1 and 32, both models.
decoding: our time per generated token at lengths 16, 32 and 64, with and without the KV cache.
data: images/s through the JSONL/COCO loader (COCO-sized JPEGs, per worker).
fusion (only when asked, --only fusion): cross-attention against prefix decoding as the image
grows (--patches): a training step's time and FLOPs, one caption's decoding time, attention
FLOPs of both.
variants (only when asked, --only variants): architectures side by side, each the preset with
its own overrides (--variant "NAME=KEY=VALUE KEY=VALUE"; by default the attention variants:
every key/value head count that divides the heads, with added or rotary positions): training
images/s, decoding ms/token at --lengths for each --batch-sizes, KV-cache bytes per image.
precision (only when asked, with --ckpt): a trained checkpoint's test captions with float32
weights and with --low-dtype ones: how many stay identical (greedy, beam 3), and captions/s of
each at --batch-sizes.
features (only when asked): training images/s with the encoder frozen, from COCO-sized JPEGs
through it and from its stored outputs (data.cache_features), --steps steps of --train-batch,
and the store's build rate and size per image.
For randomly initialised models of a `conf/model/` preset (with the KEY=VALUE overrides);
medians of repeated runs in turns. --device cuda runs training (bf16 autocast), generation,
decoding and variants on a GPU, timed to the end of the queued work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from captioner.benchmark import (
    FeatureSpeed,
    FusionCost,
    Measurement,
    PrecisionCheck,
    Throughput,
    TrainingSpeed,
    VariantCost,
    cache_summary,
    data_benchmark,
    decoding_benchmark,
    feature_cache_speed,
    fusion_scaling,
    generation_benchmark,
    precision_check,
    training_benchmark,
    variant_costs,
)
from captioner.checkpoint import load_checkpoint
from captioner.cli import user_errors
from captioner.errors import ConfigError
from captioner.inference import DTYPES, usable_device
from captioner.lit_module import ENCODER_TRAINING
from captioner.models import CaptionerConfig

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("training", "generation", "decoding", "data")
FUSIONS = {
    "cross": {"kind": "cross"},
    "prefix": {"kind": "prefix"},
}
LABELS = {"captioner": "ours", "compiled": "ours, compiled", "hf": "HF"}


def preset_config(
    name: str, image_size: int, vocab_size: int, overrides: Sequence[str] = ()
) -> CaptionerConfig:
    """The architecture of `model=<name>` with `overrides` (`model/decoder=prefix`,
    `model.decoder.depth=4`, ...) at this image size, as training would build it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"model={name}", f"data.image_size={image_size}", *overrides]
        )
    model = OmegaConf.to_container(cfg.model, resolve=True)
    keys = {field.name for field in dataclasses.fields(CaptionerConfig)}
    architecture = {k: v for k, v in model.items() if k in keys}  # type: ignore[union-attr]
    encoder = architecture["encoder"]
    architecture["encoder"] = {k: v for k, v in encoder.items() if k not in ENCODER_TRAINING}
    return CaptionerConfig.from_dict({**architecture, "vocab_size": vocab_size})


def attention_variants(heads: int) -> dict[str, list[str]]:
    """Every key/value head count dividing `heads` (multi-head first, multi-query last), with
    added or rotary positions, in the encoder and the decoder alike."""
    variants = {}
    for positions in ("added", "rope"):
        for kv in sorted((k for k in range(1, heads + 1) if heads % k == 0), reverse=True):
            name = {heads: "MHA", 1: "MQA"}.get(kv, f"GQA {kv}")
            overrides = [f"model.encoder.kv_heads={kv}", f"model.decoder.kv_heads={kv}"]
            if positions == "rope":
                name += ", RoPE"
                overrides += ["model.encoder.pos_embed=rope", "model.decoder.pos_embed=rope"]
            variants[name] = overrides
    return variants


def named_overrides(text: str) -> tuple[str, list[str]]:
    """--variant "NAME=KEY=VALUE KEY=VALUE" -> (NAME, [KEY=VALUE, ...])."""
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE [KEY=VALUE ...], got {text!r}")
    return name, overrides.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a preset in conf/model/")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="Hydra overrides of the model, e.g. model/decoder=prefix model.decoder.depth=4",
    )  # fmt: skip
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=10_000, help="COCO-sized by default")
    parser.add_argument("--train-batch", type=int, default=64, help="training and loader batch")
    parser.add_argument(
        "--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
        help="training: fp32, bf16 autocast; variants: the last; decoding: see --decode-dtypes",
    )  # fmt: skip
    parser.add_argument(
        "--decode-dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
        help="decoding: the weights cast to each",
    )  # fmt: skip
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="decoding")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader processes")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=(*PARTS, "fusion", "variants", "precision", "features"),
        default=list(PARTS),
    )
    parser.add_argument(
        "--variant", type=named_overrides, action="append", metavar="NAME=OVERRIDES",
        help='variants: "NAME=KEY=VALUE KEY=VALUE", repeated (default: attention variants)',
    )  # fmt: skip
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None,
        help="decoding and variants: caption lengths (default 16 32 64 and 16 64)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (training in bf16 there)")
    parser.add_argument("--ckpt", help="precision: a trained checkpoint (.ckpt or export)")
    parser.add_argument("--low-dtype", choices=["bf16", "fp16"], default="bf16", help="precision")
    parser.add_argument("--limit", type=int, default=None, help="precision: test images")
    parser.add_argument(
        "--patches", type=int, nargs="+", default=[64, 196, 576, 1024], help="fusion: grids"
    )
    parser.add_argument("--steps", type=int, default=12, help="features: training steps")
    parser.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face model")
    parser.add_argument(
        "--compile", action="store_true", help="also train ours through torch.compile"
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with user_errors():
        device = usable_device(args.device)
        config = preset_config(args.model, args.image_size, args.vocab_size, args.overrides)
        variants = {}
        if "variants" in args.only:
            chosen = dict(args.variant or attention_variants(config.decoder.heads).items())
            variants = {
                name: preset_config(
                    args.model, args.image_size, args.vocab_size, [*args.overrides, *changes]
                )
                for name, changes in chosen.items()
            }  # fmt: skip
        if device.type != "cpu" and {"data", "fusion", "precision", "features"} & set(args.only):
            raise ConfigError(
                "--only data, fusion, precision and features measure the CPU: leave out --device."
            )
        checks = []
        if "precision" in args.only:
            if args.ckpt is None:
                raise ConfigError("--only precision compares a trained model: give --ckpt PATH.")
            checks = precision_check(
                load_checkpoint(args.ckpt), DTYPES[args.low_dtype], limit=args.limit,
                batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
            )  # fmt: skip
    hf, batches, repeats = not args.no_hf, tuple(args.batch_sizes), args.repeats
    training, generation, decoding, loading = [], [], [], []
    if "training" in args.only:
        training = training_benchmark(
            config, batch_size=args.train_batch, dtypes=tuple(args.dtypes), repeats=repeats,
            hf=hf, compiled=args.compile, device=device,
        )  # fmt: skip
    if "generation" in args.only:
        generation = generation_benchmark(
            config, batch_sizes=batches, repeats=repeats, hf=hf, device=device
        )
    if "decoding" in args.only:
        decoding = decoding_benchmark(
            config, batch_sizes=batches, lengths=tuple(args.lengths or (16, 32, 64)),
            repeats=repeats, device=device, dtypes=tuple(args.decode_dtypes),
        )  # fmt: skip
    if "data" in args.only:
        loading = data_benchmark(
            config, batch_size=args.train_batch, workers=tuple(args.workers), repeats=3
        )
    fusion = []
    if "fusion" in args.only:
        fusion = fusion_scaling(
            config, variants=FUSIONS, patches=tuple(args.patches), repeats=repeats
        )
    costs = []
    if variants:
        costs = variant_costs(
            variants, batch_size=args.train_batch, batch_sizes=batches,
            lengths=tuple(args.lengths or (16, 64)), dtype=args.dtypes[-1], repeats=repeats,
            device=device,
        )  # fmt: skip
    features = None
    if "features" in args.only:
        with tempfile.TemporaryDirectory() as folder:
            model = [f"model={args.model}", f"data.image_size={args.image_size}"]
            features = feature_cache_speed(
                [*model, *args.overrides], Path(folder), args.steps, args.train_batch
            )
    setting = {
        "model": args.model, "image_size": args.image_size, "vocab_size": args.vocab_size,
        "caption_tokens": config.max_len, "threads": args.threads, "repeats": repeats,
        "torch": torch.__version__, "device": str(device), "machine": machine_name(device),
    }  # fmt: skip
    if args.json:
        report: dict[str, Any] = {
            "setting": setting,
            "training": [{**dataclasses.asdict(r), "mfu": r.mfu} for r in training],
            "generation": [dataclasses.asdict(r) for r in generation],
            "decoding": [dataclasses.asdict(r) for r in decoding],
            "cache_summary": cache_summary(decoding),
            "data": [{**dataclasses.asdict(r), "per_worker": r.per_worker} for r in loading],
            "fusion": [dataclasses.asdict(r) for r in fusion],
            "variants": [_variant_json(r) for r in costs],
            "precision": [dataclasses.asdict(r) for r in checks],
            "features": features and {**dataclasses.asdict(features), "speedup": features.speedup},
        }
        print(json.dumps(report, indent=2))
        return
    console = Console(width=max(Console().width, 110))
    console.print(", ".join(f"{k}={v}" for k, v in setting.items()))
    if training:
        print_training(console, training)
    if generation:
        print_generation(console, generation)
    if decoding:
        print_decoding(console, decoding)
    if loading:
        print_loading(console, loading, training)
    if fusion:
        print_fusion(console, fusion)
    if costs:
        print_variants(console, costs)
    if checks:
        print_precision(console, checks)
    if features:
        print_features(console, features)


def machine_name(device: torch.device) -> str:
    """The processor's model name (and the GPU's, on one): what every speed figure is of."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}"


def _variant_json(row: VariantCost) -> dict[str, Any]:
    out = dataclasses.asdict(row)
    out["ms_per_token"] = {f"batch {b}, {n} tokens": v for (b, n), v in row.ms_per_token.items()}
    return out


def _ratio(ours: float, theirs: float | None) -> str:
    return "" if theirs is None else f"{ours / theirs:.2f}x"


def print_training(console: Console, rows: list[TrainingSpeed]) -> None:
    table = Table(title=f"training step, batch {rows[0].batch} (medians)")
    columns = ("captions", "dtype", "model", "images/s", "GFLOP/image", "GFLOP/s", "peak", "MFU")
    for column in (*columns, "ours / HF"):
        left = column in ("captions", "dtype", "model")
        table.add_column(column, justify="left" if left else "right")
    speed = {(r.model, r.dtype, r.captions): r.images_per_s for r in rows}
    for r in rows:
        theirs = speed.get(("hf", r.dtype, r.captions)) if r.model != "hf" else None
        table.add_row(
            f"{r.captions} ({r.caption_tokens:.1f} tokens)", r.dtype, LABELS[r.model],
            f"{r.images_per_s:.1f}", f"{r.gflop_per_image:.3f}",
            f"{r.images_per_s * r.gflop_per_image:.1f}", f"{r.peak_gflops:.1f}",
            f"{r.mfu:.0%}", _ratio(r.images_per_s, theirs),
        )  # fmt: skip
    console.print(table)
    parameters = {LABELS[r.model]: f"{r.parameters:,}" for r in rows}
    console.print("parameters: " + ", ".join(f"{k} {v}" for k, v in parameters.items()))


def print_generation(console: Console, rows: list[Measurement]) -> None:
    table = Table(title=f"generation, {rows[0].tokens} tokens per caption (medians, captions/s)")
    for column in ("search", "batch", "ours", "HF", "ours / HF"):
        table.add_column(column, justify="left" if column == "search" else "right")
    value = {(r.model, r.strategy, r.batch): r.value for r in rows}
    for (model, strategy, batch), ours in value.items():
        if model == "captioner":
            theirs = value.get(("hf", strategy, batch))
            shown = "" if theirs is None else f"{theirs:.1f}"
            table.add_row(strategy, str(batch), f"{ours:.1f}", shown, _ratio(ours, theirs))
    console.print(table)


def print_decoding(console: Console, rows: list[Measurement]) -> None:
    table = Table(title="ours: ms per generated token, greedy (medians)")
    for column in ("weights", "batch", "tokens", "cache", "ms/token", "fp32 / this"):
        table.add_column(column, justify="right")
    fp32 = {(r.batch, r.tokens, r.cache): r.value for r in rows if r.dtype == "fp32"}
    for r in rows:
        cache = "yes" if r.cache else "no"
        base = fp32.get((r.batch, r.tokens, r.cache))
        speedup = "" if base is None else f"{base / r.value:.2f}x"
        table.add_row(r.dtype, str(r.batch), str(r.tokens), cache, f"{r.value:.2f}", speedup)
    console.print(table)
    for name, value in cache_summary(rows).items():
        console.print(f"{name}: {value:.2f}x")


def print_loading(console: Console, rows: list[Throughput], training: list[TrainingSpeed]) -> None:
    """Loader rates, and how many workers keep our fp32 training step fed."""
    table = Table(title=f"data loading, batch {rows[0].batch} (medians, images/s)")
    for column in ("workers", "images/s", "per worker"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r.workers), f"{r.images_per_s:.1f}", f"{r.per_worker:.1f}")
    console.print(table)
    train = next((r.images_per_s for r in training if r.model == "captioner"), None)
    if train is not None:
        one = rows[0].per_worker
        console.print(
            f"one loader process makes {one / train:.1f}x the images our training step consumes "
            f"({train:.1f}/s): {math.ceil(train / one)} worker(s) keep it fed"
        )


def print_fusion(console: Console, rows: list[FusionCost]) -> None:
    """Each variant's costs per patch count, and prefix over cross."""
    table = Table(
        title=f"cross vs prefix as the image grows (medians; decoding: {rows[0].tokens} tokens)"
    )
    columns = (
        "patches", "variant", "train ms/image", "train GFLOP/image", "attention GFLOP",
        "caption ms", "caption attention MFLOP", "train time / cross", "caption time / cross",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    cross = {r.patches: r for r in rows if r.variant == "cross"}
    for r in rows:
        base = cross.get(r.patches)
        table.add_row(
            str(r.patches), r.variant, f"{r.train_ms_per_image:.1f}",
            f"{r.train_gflop_per_image:.3f}", f"{r.train_attention_gflop:.3f}",
            f"{r.caption_ms:.1f}", f"{r.caption_attention_mflop:.1f}",
            _ratio(r.train_ms_per_image, base and base.train_ms_per_image),
            _ratio(r.caption_ms, base and base.caption_ms),
        )  # fmt: skip
    console.print(table)


def print_variants(console: Console, rows: list[VariantCost]) -> None:
    """Each architecture's costs, and its ratios to the first one's."""
    keys = list(rows[0].ms_per_token)
    table = Table(title=f"architectures side by side (medians; training in {rows[0].dtype})")
    columns = (
        "variant", "params (M)", "train img/s",
        *(f"ms/token b{b} @{n}" for b, n in keys),
        *(f"KV KB/image @{n}" for n in rows[0].cache_bytes),
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    base = rows[0]

    def cell(value: float, first: float, digits: int) -> str:
        return f"{value:.{digits}f} ({_ratio(value, first)})"

    for r in rows:
        table.add_row(
            r.variant, f"{r.params / 1e6:.2f}",
            cell(r.train_images_per_s, base.train_images_per_s, 1),
            *(cell(r.ms_per_token[k], base.ms_per_token[k], 2) for k in keys),
            *(cell(v / 1024, base.cache_bytes[n] / 1024, 0) for n, v in r.cache_bytes.items()),
        )  # fmt: skip
    console.print(table)
    console.print(f"ratios: to {base.variant}")


def print_features(console: Console, row: FeatureSpeed) -> None:
    table = Table(
        title="Training with the encoder frozen: images through it, or its stored outputs"
    )
    for column in ("", "train images/s", "fit seconds"):
        table.add_column(column, justify="right")
    table.add_row("from images", f"{row.live_images_per_s:.1f}", f"{row.live_seconds:.1f}")
    table.add_row("from the store", f"{row.cached_images_per_s:.1f}", f"{row.cached_seconds:.1f}")
    console.print(table)
    console.print(
        f"stored features are {row.speedup:.1f}x faster per training step; the store took "
        f"{row.store_images_per_s:.1f} images/s to build, {row.store_bytes_per_image / 1024:.0f} "
        "KiB per image (float16)"
    )


def print_precision(console: Console, rows: list[PrecisionCheck]) -> None:
    low = rows[0].dtype
    table = Table(title=f"fp32 weights against {low} (medians, captions/s)")
    columns = ("search", "test images", "identical", "log-p gap", "scene_acc", "batch", "fp32", low,
               "ratio")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "search" else "right")
    for r in rows:
        accuracy = "" if r.scene_acc is None else " / ".join(f"{a:.3f}" for a in r.scene_acc)
        for batch, (exact, fast) in r.captions_per_s.items():
            table.add_row(
                r.strategy, str(r.images), f"{r.identical:.1%}", f"{r.logprob_gap:.3f}",
                accuracy, str(batch), f"{exact:.1f}", f"{fast:.1f}", _ratio(fast, exact),
            )  # fmt: skip
    console.print(table)
    console.print(
        "log-p gap: median, over the captions that differ, of log p(fp32's caption) - "
        f"log p({low}'s caption) under the fp32 model; scene_acc: fp32 / {low}"
    )


if __name__ == "__main__":
    main()
