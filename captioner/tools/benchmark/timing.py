"""What every suite measures with: medians of timed runs in turns, FLOPs as executed, the
machine's matmul peak, and random inputs of a captioner's shape.

Every figure is the median of `repeats` timed runs after one warm-up run, the runs of what is
compared taking turns. Models are randomly initialised; decoding lengths are fixed
(`min_length = max_length`), so a random model decodes exactly as many tokens as asked.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from captioner.core.generation import DecodingOptions, generate
from captioner.core.models import CaptionerConfig, CaptionerModel

BOS, EOS, PAD = 1, 2, 0
CPU = torch.device("cpu")
K = TypeVar("K", bound=Hashable)


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


def machine_name(device: torch.device = CPU) -> str:
    """The processor's model name (and the GPU's, on one): what every speed figure is of."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}"


def decode_call(
    model: CaptionerModel, images: torch.Tensor, **options: object
) -> Callable[[], object]:
    """A call that decodes `images` with these `DecodingOptions`, to be timed."""
    opts = DecodingOptions(**options)  # type: ignore[arg-type]
    return lambda: generate(model, images, BOS, EOS, PAD, opts)


@torch.no_grad()
def encode(model: CaptionerModel, images: torch.Tensor) -> torch.Tensor:
    """The image tokens alone: timed, so that a per-token decoding cost can leave them out."""
    return model.encode(images)[0]


def matmul_peak(
    dtype: torch.dtype, size: int = 2048, repeats: int = 5, device: torch.device = CPU
) -> float:
    """FLOP/s of one large square `torch.matmul` in `dtype`: the ceiling MFU is measured against."""
    if device.type == "cuda":
        size *= 4  # a GPU needs a larger product to reach its peak
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    seconds = median_seconds({"mm": lambda: a @ b}, repeats, device)["mm"]
    return 2 * size**3 / seconds


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


def training_step(
    model: torch.nn.Module, loss: Callable[[], torch.Tensor], dtype: str, device: torch.device = CPU
) -> Callable[[], None]:
    """One step of AdamW on `loss()` (under bf16 autocast for `dtype` "bf16"), to be timed."""
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


def ratio(ours: float, theirs: float | None) -> str:
    """`ours / theirs` as a table shows it ("1.31x"), blank without `theirs`."""
    return "" if theirs is None else f"{ours / theirs:.2f}x"
