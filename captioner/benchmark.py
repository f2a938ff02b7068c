"""Training, decoding and data-loading speed, ours and Hugging Face's, side by side in one process.

Every figure is the median of `repeats` timed runs after one warm-up run, the runs of what is
compared taking turns. Models are randomly initialised; decoding lengths are fixed
(`min_length = max_length`), so a random model decodes exactly as many tokens as asked. The
Hugging Face baseline (`captioner.baseline`) gets the same inputs, batch and threads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from captioner.baseline import hf_captioner, hf_generate, hf_loss
from captioner.checkpoint import CheckpointContents
from captioner.data import TableDataModule, Tokenizer
from captioner.generation import DecodingOptions, generate
from captioner.inference import DTYPES
from captioner.lit_module import teacher_forced_loss
from captioner.models import CaptionerConfig, CaptionerModel

BOS, EOS, PAD = 1, 2, 0
CPU = torch.device("cpu")
K = TypeVar("K", bound=Hashable)


@dataclass
class Measurement:
    """One line of the decoding report."""

    model: str  # "captioner" or "hf" (VisionEncoderDecoderModel)
    measure: str  # "captions/s" or "ms/token"
    strategy: str  # "greedy" or "beam-3"
    batch: int  # images decoded together
    tokens: int  # tokens generated per caption
    cache: bool  # decoded with the KV cache
    value: float
    dtype: str = "fp32"  # of the weights (and activations) while decoding


def median_seconds(
    functions: dict[K, Callable[[], object]], repeats: int, device: torch.device | None = None
) -> dict[K, float]:
    """Median wall time of each function over `repeats` rounds, after one warm-up round.

    The functions take turns within every round, so a slow spell of a shared machine falls on
    all of them alike and the ratios between them stay fair. On a GPU `device` each call is
    timed to the end of the work it queued.
    """
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
    times: dict[K, list[float]] = {key: [] for key in functions}
    for round_ in range(repeats + 1):
        for key, function in functions.items():
            if sync:
                sync()
            start = time.perf_counter()
            function()
            if sync:
                sync()
            if round_:  # round 0 warms up
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def decode_call(
    model: CaptionerModel, images: torch.Tensor, **options: object
) -> Callable[[], object]:
    """A call that decodes `images` with these `DecodingOptions`, to be timed."""
    opts = DecodingOptions(**options)  # type: ignore[arg-type]
    return lambda: generate(model, images, BOS, EOS, PAD, opts)


SEARCHES = {"greedy": 1, "beam-3": 3}


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
            functions[dtype, 0, True] = partial(_encode, cast, pixels)
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


@torch.no_grad()
def _encode(model: CaptionerModel, images: torch.Tensor) -> torch.Tensor:
    return model.encode(images)[0]


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


def matmul_peak(
    dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: torch.device = CPU
) -> float:
    """FLOP/s of one large square `torch.matmul` in `dtype`: the ceiling MFU is measured against."""
    if device.type == "cuda":
        size *= 4  # a GPU needs a larger product to reach its peak
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    seconds = median_seconds({"mm": lambda: a @ b}, repeats, device)["mm"]
    return 2 * size**3 / seconds


CAPTIONS = ("full", "coco")


def random_captions(config: CaptionerConfig, batch: int, lengths: str = "full") -> torch.Tensor:
    """(batch, T) token ids: <bos>, random words, <eos>, then padding. "full": every caption
    `model.max_len` tokens, no padding. "coco": COCO-like lengths, words ~ N(10.5, 2.5)
    rounded and clipped to [5, max_len - 2], padded to the longest in the batch, as a
    training batch of COCO captions is."""
    generator = torch.Generator().manual_seed(0)
    longest = config.max_len - 2
    if lengths == "full":
        words = torch.full((batch,), longest)
    else:
        normal = torch.randn(batch, generator=generator) * 2.5 + 10.5
        words = normal.round().long().clamp(5, longest)
    width = int(words.max()) + 2
    tokens = torch.randint(PAD + 3, config.vocab_size, (batch, width), generator=generator)
    at = torch.arange(width)[None, :]
    tokens[:, 0] = BOS
    tokens[at == words[:, None] + 1] = EOS
    return tokens.masked_fill(at > words[:, None] + 1, PAD)


def _training_step(
    model: torch.nn.Module, loss: Callable[[], torch.Tensor], dtype: str, device: torch.device = CPU
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the GPU attention kernels; these are the CPU one's forward and backward.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def counted_flops(function: Callable[[], object]) -> int:
    """Floating-point operations of the matmuls, convolutions and attention in one call."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        function()
    return counter.get_total_flops()


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
        (name, dtype, kind): _training_step(model, loss(name, tokens), dtype, device)
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
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / name, quality=90)
        lines.append(json.dumps({"image": name, "caption": f"a photo with number {index}"}))
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def data_benchmark(
    config: CaptionerConfig,
    *,
    batch_size: int = 64,
    workers: tuple[int, ...] = (0, 2),
    num_images: int = 256,
    repeats: int = 3,
) -> list[Throughput]:
    """The JSONL loader (the path COCO, Karpathy and Flickr share) on COCO-sized JPEGs at the
    model's image size: loading is not the bottleneck while workers x images/s per worker
    exceeds the training rate."""
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
            functions[name, "train"] = _training_step(model, lambda loss=loss: loss()[0], "fp32")
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


@dataclass
class VariantCost:
    """One architecture's training and decoding costs, measured in turns with the others'."""

    variant: str  # its label (`CaptionerConfig.label`)
    params: int
    train_images_per_s: float  # training step (forward, backward, AdamW) under `dtype`
    dtype: str  # of the training step: "fp32", or "bf16" autocast
    ms_per_token: dict[tuple[int, int], float]  # (batch, caption length) -> greedy, cached
    cache_bytes: dict[int, int]  # caption length -> KV-cache bytes per image


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
        functions[name, "train", 0, 0] = _training_step(
            model, lambda loss=loss: loss()[0], dtype, device
        )
        for batch in batch_sizes:
            some = images[:batch].contiguous()
            functions[name, "encode", batch, 0] = partial(_encode, model, some)
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


@dataclass
class PrecisionCheck:
    """A trained checkpoint decoded with float32 weights and with lower-precision ones."""

    dtype: str  # the lower precision, e.g. "bf16"
    strategy: str  # "greedy" or "beam-3"
    images: int  # test images captioned by both
    identical: float  # fraction of images whose captions are token for token the same
    captions_per_s: dict[int, tuple[float, float]]  # batch -> (fp32, low), medians
    logprob_gap: float  # median, over the captions that differ, of how much likelier (nats)
    # the float32 model finds its own caption than the other: near 0 means near-ties
    scene_acc: tuple[float, float] | None  # shapes: captions true of their scene, (fp32, low)


def precision_check(
    contents: CheckpointContents,
    dtype: torch.dtype,
    *,
    limit: int | None = None,
    batch_sizes: tuple[int, ...] = (1,),
    timed_images: int = 16,
    repeats: int = 5,
) -> list[PrecisionCheck]:
    """How often a checkpoint's test captions stay the same with its weights in `dtype`, and
    how much faster they come: the first `limit` images of its recorded test split, greedy and
    beam 3; the speed of captioning `timed_images` of them `batch` at a time, the two
    precisions in turns."""
    fp32, low = contents.build_model(), contents.build_model().to(dtype)
    tokenizer = Tokenizer.from_dict(contents.tokenizer)
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    datamodule = contents.datamodule()
    datamodule.setup("test")
    batches, scenes = [], []
    for batch in datamodule.test_dataloader()[0]:
        batches.append(batch["images"])
        scenes += list(batch.get("scenes") or [])
        if limit is not None and sum(map(len, batches)) >= limit:
            break
    images = torch.cat(batches)[:limit]
    scenes = scenes[: len(images)]
    rows = []
    for strategy, beams in SEARCHES.items():
        caption = partial(_caption_all, ids=ids, beams=beams)
        exact, fast = caption(fp32, images.split(64)), caption(low, images.split(64))
        same = (exact == fast).all(dim=1)
        differ = (~same).nonzero().flatten()
        gap = torch.zeros(1)
        if len(differ):
            picked = images[differ]
            gap = _logprob(fp32, picked, exact[differ], ids) - _logprob(
                fp32, picked, fast[differ], ids
            )
        scene_acc = None
        if scenes:  # the ground truth is known: is each caption true of its scene?
            scene_acc = tuple(
                statistics.fmean(
                    scene.caption_is_correct(tokenizer.decode(row.tolist()))
                    for scene, row in zip(scenes, tokens, strict=True)
                )
                for tokens in (exact, fast)
            )
        speed = {}
        for batch in batch_sizes:
            chunks = images[:timed_images].split(batch)
            timed = median_seconds(
                {"fp32": partial(caption, fp32, chunks), "low": partial(caption, low, chunks)},
                repeats,
            )
            count = sum(map(len, chunks))
            speed[batch] = (count / timed["fp32"], count / timed["low"])
        name = next(k for k, v in DTYPES.items() if v == dtype)
        rows.append(PrecisionCheck(
            name, strategy, len(images), same.float().mean().item(), speed,
            gap.median().item(), scene_acc,
        ))  # fmt: skip
    return rows


@torch.no_grad()
def _logprob(
    model: CaptionerModel, images: torch.Tensor, tokens: torch.Tensor, ids: tuple[int, int, int]
) -> torch.Tensor:
    """log p(caption | image) under `model` of each padded caption (B, T), <eos> included."""
    bos, _, pad = ids
    inputs = torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)
    logprobs = model(images, inputs).float().log_softmax(-1)
    picked = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
    return picked.masked_fill(tokens == pad, 0.0).sum(dim=1)


def _caption_all(
    model: CaptionerModel,
    chunks: tuple[torch.Tensor, ...],
    *,
    ids: tuple[int, int, int],
    beams: int,
) -> torch.Tensor:
    """The tokens of every image's caption (images, longest), padded, batch by batch."""
    dtype, options = next(model.parameters()).dtype, DecodingOptions(beam_size=beams)
    tokens = [generate(model, chunk.to(dtype), *ids, options).tokens for chunk in chunks]
    width = max(t.shape[1] for t in tokens)
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=ids[2]) for t in tokens])


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
    overrides: list[str], folder: Path, steps: int = 12, batch_size: int = 32, workers: int = 2
) -> FeatureSpeed:
    """Two short trainings through `tasks.train` (`overrides` choose the model; its encoder
    is frozen): from images, and with `data.cache_features`, building the store first."""
    from captioner.tasks import compose_config, train  # the whole training stack

    annotations = write_photo_dataset(folder, steps * batch_size)
    common = [
        "data=jsonl", f"data.train_file={annotations}", f"data.val_file={annotations}",
        "data.min_freq=1", f"data.batch_size={batch_size}", f"data.num_workers={workers}",
        f"data.feature_dir={folder / 'features'}", "model.encoder.freeze=all",
        f"trainer.max_steps={steps}", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
        "test=false", "~logger", "~callbacks", "+trainer.enable_checkpointing=false",
        *overrides,
    ]  # fmt: skip
    runs = []
    for name, cached in (("live", False), ("cached", True)):
        cfg = compose_config("train", [*common, f"data.cache_features={cached}"], folder / name)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the benchmark's report
            metrics, objects = train(cfg)
        runs.append((metrics, objects["datamodule"]))
    (live, _), (cached_run, data) = runs
    store, build = data.features, data.feature_seconds
    return FeatureSpeed(
        live["train/images_per_s"], cached_run["train/images_per_s"], live["train/seconds"],
        cached_run["train/seconds"] - build, store.rows / build, store.nbytes_per_row(),
    )  # fmt: skip
