"""Generation speed: captions/s, greedy and beam 3, exactly 20 tokens each, at each batch size,
ours on our KV cache and Hugging Face's `generate()` on its cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from rich.console import Console

from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.tools.baseline import hf_captioner, hf_generate
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.tools.benchmark.timing import (
    BOS,
    CPU,
    EOS,
    PAD,
    decode_call,
    median_seconds,
    ratio,
)

SEARCHES = {"greedy": 1, "beam-3": 3}


@dataclass
class Measurement:
    """One line of the generation or decoding report."""

    model: str  # "captioner" or "hf" (VisionEncoderDecoderModel)
    measure: str  # "captions/s" or "ms/token"
    strategy: str  # "greedy" or "beam-3"
    batch: int  # images decoded together
    tokens: int  # tokens generated per caption
    cache: bool  # decoded with the KV cache
    value: float
    dtype: str = "fp32"  # of the weights (and activations) while decoding


def generation_benchmark(
    config: CaptionerConfig,
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    caption_tokens: int = 20,
    repeats: int = 7,
    hf: bool = True,
    device: torch.device = CPU,
) -> list[Measurement]:
    """Captions/second for greedy and beam-3 search, ours on our KV cache and, with `hf`,
    Hugging Face's `generate()` on its cache, exactly `caption_tokens` tokens per caption."""
    config = replace(config, max_len=max(config.max_len, caption_tokens + 1))
    torch.manual_seed(0)
    models = {"captioner": CaptionerModel(config).eval().to(device)}
    if hf:
        models["hf"] = hf_captioner(config, BOS, EOS, PAD).eval().to(device)
    rows: list[Measurement] = []
    for batch in batch_sizes:
        images = torch.randn(batch, config.encoder.in_channels, *config.image_size, device=device)
        functions: dict[tuple[str, str], Callable[[], object]] = {}
        for name, k in SEARCHES.items():
            functions["captioner", name] = decode_call(
                models["captioner"], images, beam_size=k,
                min_length=caption_tokens, max_length=caption_tokens,
            )  # fmt: skip
            if hf:
                functions["hf", name] = partial(
                    hf_generate, models["hf"], images, caption_tokens, k
                )
        for (model, name), seconds in median_seconds(functions, repeats, device).items():
            rows.append(
                Measurement(model, "captions/s", name, batch, caption_tokens, True, batch / seconds)
            )
    return rows


def _run(setting: Setting) -> list[Measurement]:
    args = setting.args
    return generation_benchmark(
        setting.config, batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
        hf=not args.no_hf, device=setting.device,
    )  # fmt: skip


def _show(console: Console, rows: list[Measurement], _: dict[str, list[Any]]) -> None:
    out = table(
        f"generation, {rows[0].tokens} tokens per caption (medians, captions/s)",
        ("search", "batch", "ours", "HF", "ours / HF"), ("search",),
    )  # fmt: skip
    value = {(r.model, r.strategy, r.batch): r.value for r in rows}
    for (model, strategy, batch), ours in value.items():
        if model == "captioner":
            theirs = value.get(("hf", strategy, batch))
            shown = "" if theirs is None else f"{theirs:.1f}"
            out.add_row(strategy, str(batch), f"{ours:.1f}", shown, ratio(ours, theirs))
    console.print(out)


SUITE = Suite("generation", _run, _show, default=True)
