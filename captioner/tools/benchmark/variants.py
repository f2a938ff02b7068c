"""Architectures side by side, each the preset with its own overrides (`--variant "NAME=KEY=VALUE
KEY=VALUE"`; by default the attention variants: every key/value head count that divides the
heads, with added or rotary positions): training images/s, decoding ms/token at `--lengths`
for each `--batch-sizes`, KV-cache bytes per image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
from rich.console import Console

from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.tools.benchmark.timing import (
    BOS,
    CPU,
    PAD,
    decode_call,
    encode,
    median_seconds,
    random_captions,
    ratio,
    training_step,
)
from captioner.training.lit_module import teacher_forced_loss


@dataclass
class VariantCost:
    """One architecture's training and decoding costs, measured in turns with the others'."""

    variant: str  # its label (`CaptionerConfig.label`)
    params: int
    train_images_per_s: float  # training step (forward, backward, AdamW) under `dtype`
    dtype: str  # of the training step: "fp32", or "bf16" autocast
    ms_per_token: dict[tuple[int, int], float]  # (batch, caption length) -> greedy, cached
    cache_bytes: dict[int, int]  # caption length -> KV-cache bytes per image


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


@torch.no_grad()
def cache_bytes(model: CaptionerModel, length: int, batch: int = 1) -> int:
    """What the decoder keeps per image while it decodes captions of `length` tokens."""
    config, weight = model.config, next(model.parameters())
    images = weight.new_zeros(batch, config.encoder.in_channels, *config.image_size)
    memory, _ = model.encode(images)
    cache = model.decoder.init_cache(memory, max_len=length)
    bos = torch.full((batch, 1), BOS, device=weight.device)
    model.decoder(bos, None, cache=cache, last_only=True)
    return cache.nbytes // batch


def variant_costs(
    configs: dict[str, CaptionerConfig],
    *,
    batch_size: int = 64,
    batch_sizes: tuple[int, ...] = (1, 32),
    lengths: tuple[int, ...] = (16, 64),
    dtype: str = "bf16",
    repeats: int = 7,
    device: torch.device = CPU,
) -> list[VariantCost]:
    """Training images/s, greedy decoding ms/token (KV cache, the encoder's time subtracted)
    at each batch size and caption length, and KV-cache bytes per image, of each named
    architecture: any preset with any overrides, every figure timed in turns."""
    functions: dict[tuple[str, str, int, int], Callable[[], object]] = {}
    models = {}
    for name, config in configs.items():
        config = replace(config, max_len=max(config.max_len, max(lengths) + 1))
        torch.manual_seed(0)
        model = models[name] = CaptionerModel(config).eval().to(device)  # dropout off
        images = torch.randn(batch_size, config.encoder.in_channels, *config.image_size,
                             device=device)  # fmt: skip
        captions = random_captions(config, batch_size, "coco").to(device)
        loss = partial(teacher_forced_loss, model, images, captions, PAD)
        functions[name, "train", 0, 0] = training_step(
            model, lambda loss=loss: loss()[0], dtype, device
        )
        for batch in batch_sizes:
            some = images[:batch].contiguous()
            functions[name, "encode", batch, 0] = partial(encode, model, some)
            for length in lengths:
                functions[name, "decode", batch, length] = decode_call(
                    model, some, min_length=length, max_length=length
                )
    timed = median_seconds(functions, repeats, device)
    rows = []
    for name, model in models.items():
        per_token = {
            (batch, length): 1000 * (timed[name, "decode", batch, length]
                                     - timed[name, "encode", batch, 0]) / length
            for batch in batch_sizes for length in lengths
        }  # fmt: skip
        rows.append(VariantCost(
            name, model.num_parameters(), batch_size / timed[name, "train", 0, 0], dtype,
            per_token, {length: cache_bytes(model, length) for length in lengths},
        ))  # fmt: skip
    return rows


def _run(setting: Setting) -> list[VariantCost]:
    args = setting.args
    chosen = dict(args.variant or attention_variants(setting.config.decoder.heads).items())
    configs = {
        name: setting.preset([*args.overrides, *changes]) for name, changes in chosen.items()
    }
    return variant_costs(
        configs, batch_size=args.train_batch, batch_sizes=tuple(args.batch_sizes),
        lengths=tuple(args.lengths or (16, 64)), dtype=args.dtypes[-1], repeats=args.repeats,
        device=setting.device,
    )  # fmt: skip


def _show(console: Console, rows: list[VariantCost], _: dict[str, list[Any]]) -> None:
    """Each architecture's costs, and its ratios to the first one's."""
    keys = list(rows[0].ms_per_token)
    columns = (
        "variant", "params (M)", "train img/s",
        *(f"ms/token b{b} @{n}" for b, n in keys),
        *(f"KV KB/image @{n}" for n in rows[0].cache_bytes),
    )  # fmt: skip
    out = table(
        f"architectures side by side (medians; training in {rows[0].dtype})", columns, ("variant",)
    )
    base = rows[0]

    def cell(value: float, first: float, digits: int) -> str:
        return f"{value:.{digits}f} ({ratio(value, first)})"

    for r in rows:
        out.add_row(
            r.variant, f"{r.params / 1e6:.2f}",
            cell(r.train_images_per_s, base.train_images_per_s, 1),
            *(cell(r.ms_per_token[k], base.ms_per_token[k], 2) for k in keys),
            *(cell(v / 1024, base.cache_bytes[n] / 1024, 0) for n, v in r.cache_bytes.items()),
        )  # fmt: skip
    console.print(out)
    console.print(f"ratios: to {base.variant}")


def _json(row: VariantCost) -> dict[str, Any]:
    out = asdict(row)
    out["ms_per_token"] = {f"batch {b}, {n} tokens": v for (b, n), v in row.ms_per_token.items()}
    return out


SUITE = Suite("variants", _run, _show, lambda rows: {"variants": [_json(r) for r in rows]})
