"""Training speed: images/s and model FLOPs utilisation of a training step (forward, backward,
AdamW) in fp32 and under bf16 autocast, ours and Hugging Face's VisionEncoderDecoderModel of the
same architecture (`captioner.tools.baseline`), on the same images, captions, batch and threads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from rich.console import Console

from captioner.core.inference import DTYPES
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.tools.baseline import hf_captioner, hf_loss
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.tools.benchmark.timing import (
    BOS,
    CPU,
    EOS,
    PAD,
    counted_flops,
    matmul_peak,
    median_seconds,
    random_captions,
    ratio,
    training_step,
)
from captioner.training.lit_module import teacher_forced_loss

CAPTIONS = ("full", "coco")
LABELS = {"captioner": "ours", "compiled": "ours, compiled", "hf": "HF"}


@dataclass
class TrainingSpeed:
    """One model's training step (forward, backward, AdamW) at one precision."""

    model: str  # "captioner" or "hf"
    dtype: str  # "fp32", or "bf16": float32 weights under bfloat16 autocast
    captions: str  # "full" (max_len tokens each) or "coco" (COCO-like lengths, padded)
    batch: int
    caption_tokens: float  # mean tokens per caption, <bos> and <eos> included
    parameters: int
    images_per_s: float
    gflop_per_image: float  # forward + backward, as counted by FlopCounterMode
    peak_gflops: float  # this machine's large-matmul rate in this dtype, measured in the run

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation: achieved FLOP/s over the measured matmul peak."""
        return self.images_per_s * self.gflop_per_image / self.peak_gflops


def training_benchmark(
    config: CaptionerConfig,
    *,
    batch_size: int = 64,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    captions: tuple[str, ...] = CAPTIONS,
    repeats: int = 7,
    hf: bool = True,
    compiled: bool = False,
    device: torch.device = CPU,
) -> list[TrainingSpeed]:
    """Images/second and MFU of our training step and, with `hf`, of Hugging Face's, on the
    same images and captions (`random_captions`), batch and threads; with `compiled`, also
    ours through `torch.compile` (what `model.compile=true` trains with).

    FLOPs are those each model executes: padded positions our loss never projects are not
    counted for us, while Hugging Face's model computes and counts them. The compiled step
    does the same work as the eager one, and is counted as such.
    """
    torch.manual_seed(0)
    ours = CaptionerModel(config).train().to(device)
    models: dict[str, torch.nn.Module] = {"captioner": ours}
    if compiled:
        models["compiled"] = ours
    if hf:
        models["hf"] = hf_captioner(config, BOS, EOS, PAD).train().to(device)
    images = torch.randn(batch_size, config.encoder.in_channels, *config.image_size, device=device)
    batches = {kind: random_captions(config, batch_size, kind).to(device) for kind in captions}

    def loss(name: str, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
        if name == "hf":
            return lambda: hf_loss(models["hf"], images, tokens, PAD)
        loss = partial(teacher_forced_loss, ours)
        caption_loss = torch.compile(loss) if name == "compiled" else loss
        return lambda: caption_loss(images, tokens, PAD)[0]

    steps = {
        (name, dtype, kind): training_step(model, loss(name, tokens), dtype, device)
        for kind, tokens in batches.items()
        for dtype in dtypes
        for name, model in models.items()
    }
    flops = {
        (name, dtype, kind): counted_flops(
            steps["captioner" if name == "compiled" else name, dtype, kind]
        )
        for name, dtype, kind in steps
    }
    timed = median_seconds(steps, repeats, device)
    peaks = {dtype: matmul_peak(DTYPES[dtype], repeats=repeats, device=device) for dtype in dtypes}
    rows = []
    for (name, dtype, kind), seconds in timed.items():
        tokens = float((batches[kind] != PAD).sum()) / batch_size
        parameters = sum(p.numel() for p in models[name].parameters())
        gflop = flops[name, dtype, kind] / batch_size / 1e9
        speed, peak = batch_size / seconds, peaks[dtype] / 1e9
        rows.append(
            TrainingSpeed(name, dtype, kind, batch_size, tokens, parameters, speed, gflop, peak)
        )
    return rows


def _run(setting: Setting) -> list[TrainingSpeed]:
    args = setting.args
    return training_benchmark(
        setting.config, batch_size=args.train_batch, dtypes=tuple(args.dtypes),
        repeats=args.repeats, hf=not args.no_hf, compiled=args.compile, device=setting.device,
    )  # fmt: skip


def _show(console: Console, rows: list[TrainingSpeed], _: dict[str, list[Any]]) -> None:
    columns = ("captions", "dtype", "model", "images/s", "GFLOP/image", "GFLOP/s", "peak", "MFU")
    out = table(
        f"training step, batch {rows[0].batch} (medians)", (*columns, "ours / HF"), columns[:3]
    )
    speed = {(r.model, r.dtype, r.captions): r.images_per_s for r in rows}
    for r in rows:
        theirs = speed.get(("hf", r.dtype, r.captions)) if r.model != "hf" else None
        out.add_row(
            f"{r.captions} ({r.caption_tokens:.1f} tokens)", r.dtype, LABELS[r.model],
            f"{r.images_per_s:.1f}", f"{r.gflop_per_image:.3f}",
            f"{r.images_per_s * r.gflop_per_image:.1f}", f"{r.peak_gflops:.1f}",
            f"{r.mfu:.0%}", ratio(r.images_per_s, theirs),
        )  # fmt: skip
    console.print(out)
    parameters = {LABELS[r.model]: f"{r.parameters:,}" for r in rows}
    console.print("parameters: " + ", ".join(f"{k} {v}" for k, v in parameters.items()))


def _report(rows: list[TrainingSpeed]) -> dict[str, Any]:
    return {"training": [{**dataclasses.asdict(r), "mfu": r.mfu} for r in rows]}


SUITE = Suite("training", _run, _show, _report, default=True)
