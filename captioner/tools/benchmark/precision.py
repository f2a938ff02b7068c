"""Lower-precision weights on a trained checkpoint (`--ckpt`): its test captions with float32
weights and with `--low-dtype` ones, how many stay identical (greedy, beam 3), and captions/s of
each at `--batch-sizes`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from captioner.core.checkpoint import CheckpointContents, load_checkpoint
from captioner.core.generation import DecodingOptions, generate
from captioner.core.inference import DTYPES
from captioner.core.models import CaptionerModel
from captioner.core.tokenizer import Tokenizer
from captioner.data.stored import recorded_datamodule
from captioner.tools.benchmark.generation import SEARCHES
from captioner.tools.benchmark.suite import Setting, Suite, table
from captioner.tools.benchmark.timing import median_seconds, ratio


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
    datamodule = recorded_datamodule(contents)
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


def _run(setting: Setting) -> list[PrecisionCheck]:
    args = setting.args  # the command line has checked that --ckpt is given
    return precision_check(
        load_checkpoint(args.ckpt), DTYPES[args.low_dtype], limit=args.limit,
        batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
    )  # fmt: skip


def _show(console: Console, rows: list[PrecisionCheck], _: dict[str, list[Any]]) -> None:
    low = rows[0].dtype
    columns = ("search", "test images", "identical", "log-p gap", "scene_acc", "batch", "fp32",
               low, "ratio")  # fmt: skip
    out = table(f"fp32 weights against {low} (medians, captions/s)", columns, ("search",))
    for r in rows:
        accuracy = "" if r.scene_acc is None else " / ".join(f"{a:.3f}" for a in r.scene_acc)
        for batch, (exact, fast) in r.captions_per_s.items():
            out.add_row(
                r.strategy, str(r.images), f"{r.identical:.1%}", f"{r.logprob_gap:.3f}",
                accuracy, str(batch), f"{exact:.1f}", f"{fast:.1f}", ratio(fast, exact),
            )  # fmt: skip
    console.print(out)
    console.print(
        "log-p gap: median, over the captions that differ, of log p(fp32's caption) - "
        f"log p({low}'s caption) under the fp32 model; scene_acc: fp32 / {low}"
    )


SUITE = Suite("precision", _run, _show, cpu_only=True)
