"""Fusion cost as the image grows (`--patches`): cross-attention against prefix decoding, a
training step's time and FLOPs, one caption's decoding time, and the attention FLOPs of both."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from rich.console import Console

from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.tools.benchmark.timing import (
    PAD,
    counted_flops,
    decode_call,
    median_seconds,
    random_captions,
    ratio,
    training_step,
)
from captioner.training.lit_module import teacher_forced_loss

FUSIONS = {"cross": {"kind": "cross"}, "prefix": {"kind": "prefix"}}


@dataclass
class FusionCost:
    """One decoder variant's costs at one number of image patches."""

    variant: str  # "cross", "prefix", ...
    patches: int
    train_ms_per_image: float  # training step (fp32, forward, backward, AdamW), per image
    train_gflop_per_image: float  # counted by FlopCounterMode, forward + backward
    train_attention_gflop: float  # forward attention products per image, as trained
    caption_ms: float  # one caption, greedy, batch 1, KV cache, encoder included
    caption_attention_mflop: float  # attention products of that caption, as decoded
    tokens: int  # tokens per decoded caption


def fusion_scaling(
    config: CaptionerConfig,
    *,
    variants: dict[str, dict[str, Any]],
    patches: tuple[int, ...] = (64, 196, 576, 1024),
    batch_size: int = 8,
    tokens: int = 16,
    repeats: int = 5,
) -> list[FusionCost]:
    """Training-step and decoding cost of decoder `variants` (name -> `model.decoder` fields to
    change) as the image grows to `patches` patches (square grids of `config`'s patch size):
    the variants of one size are timed in turns."""
    rows = []
    for count in patches:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} patches is not a square grid")
        pixels = side * config.encoder.patch_size
        encoder = replace(config.encoder, image_size=(pixels, pixels))
        models, functions = {}, {}
        images = torch.randn(batch_size, encoder.in_channels, pixels, pixels)
        captions = random_captions(config, batch_size, "coco")
        for name, change in variants.items():
            torch.manual_seed(0)
            variant = replace(config, encoder=encoder, decoder=replace(config.decoder, **change))
            model = models[name] = CaptionerModel(variant).eval()  # dropout off: same work
            loss = partial(teacher_forced_loss, model, images, captions, PAD)
            functions[name, "train"] = training_step(model, lambda loss=loss: loss()[0], "fp32")
            functions[name, "decode"] = decode_call(
                model, images[:1], min_length=tokens, max_length=tokens
            )
        flops = {name: counted_flops(functions[name, "train"]) for name in variants}
        timed = median_seconds(functions, repeats)
        words = float((captions != PAD).sum()) / batch_size - 1  # input positions per caption
        for name, model in models.items():
            rows.append(FusionCost(
                name, count, 1000 * timed[name, "train"] / batch_size,
                flops[name] / batch_size / 1e9,
                sum(model.attention_flops(round(words), cached=False).values()) / 1e9,
                1000 * timed[name, "decode"],
                sum(model.attention_flops(tokens).values()) / 1e6, tokens,
            ))  # fmt: skip
    return rows


def _run(setting: Setting) -> list[FusionCost]:
    args = setting.args
    return fusion_scaling(
        setting.config, variants=FUSIONS, patches=tuple(args.patches), repeats=args.repeats
    )


def _show(console: Console, rows: list[FusionCost], _: dict[str, list[Any]]) -> None:
    """Each variant's costs per patch count, and prefix over cross."""
    columns = (
        "patches", "variant", "train ms/image", "train GFLOP/image", "attention GFLOP",
        "caption ms", "caption attention MFLOP", "train time / cross", "caption time / cross",
    )  # fmt: skip
    out = table(
        f"cross vs prefix as the image grows (medians; decoding: {rows[0].tokens} tokens)",
        columns, ("variant",),
    )  # fmt: skip
    cross = {r.patches: r for r in rows if r.variant == "cross"}
    for r in rows:
        base = cross.get(r.patches)
        out.add_row(
            str(r.patches), r.variant, f"{r.train_ms_per_image:.1f}",
            f"{r.train_gflop_per_image:.3f}", f"{r.train_attention_gflop:.3f}",
            f"{r.caption_ms:.1f}", f"{r.caption_attention_mflop:.1f}",
            ratio(r.train_ms_per_image, base and base.train_ms_per_image),
            ratio(r.caption_ms, base and base.caption_ms),
        )  # fmt: skip
    console.print(out)


SUITE = Suite("fusion", _run, _show, cpu_only=True)
