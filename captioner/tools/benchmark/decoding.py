"""Decoding cost: our time per generated token at several caption lengths, with and without the
KV cache, with the weights in each of `--decode-dtypes`."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import torch
from rich.console import Console

from captioner.core.inference import DTYPES
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.tools.benchmark.generation import Measurement
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.tools.benchmark.timing import CPU, decode_call, encode, median_seconds


def decoding_benchmark(
    config: CaptionerConfig,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    lengths: tuple[int, ...] = (16, 32, 64),
    repeats: int = 7,
    device: torch.device = CPU,
    dtypes: tuple[str, ...] = ("fp32",),
) -> list[Measurement]:
    """Our time per generated token at several caption lengths, with and without the KV cache,
    with the weights in each of `dtypes` (the same weights, cast).

    Time per token leaves out the image encoder: it is timed alone and subtracted, so the
    figure is what one more word costs.
    """
    config = replace(config, max_len=max(lengths) + 1)
    torch.manual_seed(0)
    model = CaptionerModel(config).eval().to(device)
    models = {dtype: copy.deepcopy(model).to(DTYPES[dtype]) for dtype in dtypes}
    rows: list[Measurement] = []
    for batch in batch_sizes:
        images = torch.randn(batch, config.encoder.in_channels, *config.image_size, device=device)
        functions: dict[tuple[str, int, bool], Callable[[], object]] = {}
        for dtype, cast in models.items():
            pixels = images.to(DTYPES[dtype])
            functions[dtype, 0, True] = partial(encode, cast, pixels)
            for length in lengths:
                for cached in (True, False):
                    functions[dtype, length, cached] = decode_call(
                        cast, pixels, min_length=length, max_length=length, use_cache=cached
                    )
        timed = median_seconds(functions, repeats, device)
        for (dtype, length, cached), seconds in timed.items():
            if length:
                ms = 1000 * (seconds - timed[dtype, 0, True]) / length
                rows.append(Measurement(
                    "captioner", "ms/token", "greedy", batch, length, cached, ms, dtype
                ))  # fmt: skip
    return rows


def cache_summary(rows: list[Measurement]) -> dict[str, float]:
    """Per batch size: how flat the cached cost per token is (longest length over shortest),
    and how much faster cached decoding is than recomputation at each length."""
    per_token = {
        (r.batch, r.tokens, r.cache): r.value
        for r in rows
        if r.measure == "ms/token" and r.dtype == "fp32"
    }
    if not per_token:
        return {}
    lengths = sorted({tokens for _, tokens, _ in per_token})
    out = {}
    for batch in sorted({batch for batch, _, _ in per_token}):
        short, long = per_token[batch, lengths[0], True], per_token[batch, lengths[-1], True]
        out[f"batch {batch}: cached ms/token, length {lengths[-1]} / {lengths[0]}"] = long / short
        for length in lengths:
            speedup = per_token[batch, length, False] / per_token[batch, length, True]
            out[f"batch {batch}: cache speed-up, {length} tokens"] = speedup
    return out


def _run(setting: Setting) -> list[Measurement]:
    args = setting.args
    return decoding_benchmark(
        setting.config, batch_sizes=tuple(args.batch_sizes),
        lengths=tuple(args.lengths or (16, 32, 64)), repeats=args.repeats,
        device=setting.device, dtypes=tuple(args.decode_dtypes),
    )  # fmt: skip


def _show(console: Console, rows: list[Measurement], _: dict[str, list[Any]]) -> None:
    out = table(
        "ours: ms per generated token, greedy (medians)",
        ("weights", "batch", "tokens", "cache", "ms/token", "fp32 / this"),
    )
    fp32 = {(r.batch, r.tokens, r.cache): r.value for r in rows if r.dtype == "fp32"}
    for r in rows:
        cache = "yes" if r.cache else "no"
        base = fp32.get((r.batch, r.tokens, r.cache))
        speedup = "" if base is None else f"{base / r.value:.2f}x"
        out.add_row(r.dtype, str(r.batch), str(r.tokens), cache, f"{r.value:.2f}", speedup)
    console.print(out)
    for name, value in cache_summary(rows).items():
        console.print(f"{name}: {value:.2f}x")


def _report(rows: list[Measurement]) -> dict[str, Any]:
    return {"decoding": [asdict(r) for r in rows], "cache_summary": cache_summary(rows)}


SUITE = Suite("decoding", _run, _show, _report, default=True)
