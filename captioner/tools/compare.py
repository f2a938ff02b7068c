"""Training runs of different architectures side by side: what each scored, and what it costs.

Runs of one architecture (seeds) are one row: quality as the mean and spread over them, from
each run's `metrics.json`; the costs of the architecture measured here, every variant in one
process taking turns (`median_seconds`), on randomly initialised weights of the run's shape:
decoding time per token, KV-cache bytes per image, attention FLOPs per caption.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from captioner.core.checkpoint import load_checkpoint
from captioner.core.errors import CheckpointError, DataError
from captioner.core.models import CaptionerConfig, CaptionerModel
from captioner.tools.benchmark.timing import decode_call, median_seconds
from captioner.tools.benchmark.variants import cache_bytes
from captioner.viz import save_figure

PARTS = ("encoder", "decoder_self", "image_reading")
DIGITS = {"CIDEr": 2, "train img/s": 1, "steps": 0, "wall s": 0}  # else 3
QUALITY = {  # column -> metrics.json key
    "scene_acc": "test/scene_acc",
    "test_comp": "test_comp/scene_acc",
    "CIDEr": "test/CIDEr",
    "pointing": "test/grounding/pointing_acc",
}
TRAINING = {"steps": "train/steps", "train img/s": "train/images_per_s", "wall s": "train/seconds"}


@dataclass
class Run:
    """One training run's folder, scores and architecture."""

    folder: Path
    metrics: dict[str, float]
    config: CaptionerConfig
    curve: dict[int, float] = field(default_factory=dict)  # step -> val/scene_acc
    name: str | None = None  # the row it belongs to, where the user named it

    def seconds_at(self, step: int) -> float:
        """Training seconds when `step` was reached, at the run's mean pace (validation
        included): a run logs steps, not times."""
        return step / self.metrics["train/steps"] * self.metrics["train/seconds"]


@dataclass
class Variant:
    """Every run of one architecture, and that architecture's measured costs."""

    name: str
    config: CaptionerConfig
    runs: list[Run] = field(default_factory=list)
    params: int = 0
    ms_per_token: dict[int, float] = field(default_factory=dict)  # caption length -> ms
    cache_bytes: int = 0  # per image, for the longest caption measured
    attention_flops: dict[str, int] = field(default_factory=dict)  # per caption


def named_paths(arguments: Iterable[str]) -> list[tuple[str | None, Path]]:
    """RUN_DIR or NAME=RUN_DIR arguments: a NAME is a word (letters, digits, `_.+-`), and an
    argument that names an existing path is a path, whatever it holds."""
    named: list[tuple[str | None, Path]] = []
    for argument in arguments:
        name, sep, rest = argument.partition("=")
        if sep and re.fullmatch(r"[\w.+-]+", name) and not Path(argument).exists():
            named.append((name, Path(rest)))
        else:
            named.append((None, Path(argument)))
    return named


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run folders: each path is one (it holds `metrics.json`) or holds some, at any depth,
    as a multirun's folder does."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise DataError(f"{path}: no such run folder.")
        runs = [path] if (path / "metrics.json").is_file() else sorted(
            p.parent for p in path.rglob("metrics.json")
        )  # fmt: skip
        if not runs:
            raise DataError(
                f"{path}: no metrics.json in it or below: is it a training run's folder?"
            )
        found += [run for run in runs if run not in found]
    return found


def load_run(folder: Path, name: str | None = None) -> Run:
    """A run's metrics, and its architecture from one of its checkpoints (loaded as safely as
    any: a run folder is data, not code)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    checkpoints = sorted((folder / "checkpoints").glob("*.ckpt"))
    if not checkpoints:
        raise CheckpointError(f"{folder}: no checkpoints/*.ckpt to read the architecture from")
    return Run(folder, metrics, load_checkpoint(checkpoints[-1]).config, _curve(folder), name)


def _curve(folder: Path, key: str = "val/scene_acc") -> dict[int, float]:
    """`key` at every validation, by step, from the CSV logs (every version: a resumed run
    writes a new one); empty without a CSV logger."""
    curve = {}
    for path in sorted(folder.glob("csv/*/metrics.csv")):
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                if row.get(key) and row.get("step"):
                    curve[int(row["step"])] = float(row[key])
    return curve


def group_runs(runs: Sequence[Run]) -> list[Variant]:
    """Runs the user named alike in one variant of that name (training recipes of one
    architecture: cross-entropy, SCST, ...); the others, runs of the same architecture in one
    variant, in the order first met, named by their fusion and told apart by a number from
    each other and from the named rows (every row's name is its key in the costs and JSON)."""
    variants: list[Variant] = []
    named: dict[str, Variant] = {}
    unnamed: list[Variant] = []
    for run in runs:
        if run.name is not None:
            if run.name not in named:
                named[run.name] = Variant(run.name, run.config)
                variants.append(named[run.name])
            elif named[run.name].config.to_dict() != run.config.to_dict():
                raise DataError(
                    f"{run.folder}: its architecture differs from the other runs named "
                    f"{run.name!r}; a named row holds runs of one architecture."
                )
            named[run.name].runs.append(run)
            continue
        match = next((v for v in unnamed if v.config.to_dict() == run.config.to_dict()), None)
        if match is None:
            match = Variant(run.config.label, run.config)
            unnamed.append(match)
            variants.append(match)
        match.runs.append(run)
    taken = set(named)
    for variant in unnamed:
        label, number = variant.name, 1
        while variant.name in taken:
            number += 1
            variant.name = f"{label} #{number}"
        taken.add(variant.name)
    return variants


def measure_costs(
    variants: Sequence[Variant], lengths: tuple[int, ...] = (16, 64), repeats: int = 7
) -> None:
    """Parameters, greedy decoding ms/token (batch 1, KV cache, encoder time left out) at each
    caption length, KV-cache bytes per image at the longest, attention FLOPs per caption of
    the shortest: every variant's decoding timed in turns with the others'."""
    longest = max(lengths)
    torch.manual_seed(0)
    models = {}
    for variant in variants:
        config = replace(variant.config, max_len=max(variant.config.max_len, longest + 1))
        model = models[variant.name] = CaptionerModel(config).eval()
        variant.params = model.num_parameters()
        variant.attention_flops = model.attention_flops(min(lengths))
        variant.cache_bytes = cache_bytes(model, longest)
    functions: dict[tuple[str, int | None], Callable[[], object]] = {}
    for name, model in models.items():
        images = torch.randn(1, model.config.encoder.in_channels, *model.config.image_size)
        for length in lengths:
            functions[name, length] = decode_call(
                model, images, min_length=length, max_length=length
            )
        functions[name, None] = decode_call(model, images, min_length=1, max_length=1)
    timed = median_seconds(functions, repeats)
    for variant in variants:
        one = timed[variant.name, None]  # the encoder, the cache set-up and one token
        for length in lengths:
            ms = 1000 * (timed[variant.name, length] - one) / (length - 1)
            variant.ms_per_token[length] = ms


def _spread(values: list[float], digits: int) -> str:
    """Mean ± sample standard deviation (the mean alone for one run)."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _column(variant: Variant, key: str) -> list[float]:
    return [run.metrics[key] for run in variant.runs if key in run.metrics]


def markdown_table(variants: Sequence[Variant]) -> str:
    """One row per variant: quality over its runs (mean ± sd), training speed, decoding
    costs."""
    lengths = sorted({n for v in variants for n in v.ms_per_token})
    header = [
        "variant", "runs", "params (M)", *QUALITY, *TRAINING,
        *(f"ms/token @{n}" for n in lengths), "KV cache KB/image",
        "attention MFLOP/caption: encoder / decoder self / image reading",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    columns = {**QUALITY, **TRAINING}
    for v in variants:
        flops = v.attention_flops
        cells = [
            v.name, str(len(v.runs)), f"{v.params / 1e6:.2f}",
            *(_spread(_column(v, key), DIGITS.get(name, 3)) for name, key in columns.items()),
            *(f"{v.ms_per_token[n]:.2f}" for n in lengths),
            f"{v.cache_bytes / 1024:.0f}",
            " / ".join(f"{flops[part] / 1e6:.1f}" for part in PARTS),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curve_table(variants: Sequence[Variant]) -> str:
    """Validation scene_acc at the steps every run validated at (mean ± sd over runs): the
    variants compared at equal steps, each step also shown as its mean training time."""
    steps = sorted(set.intersection(*(set(r.curve) for v in variants for r in v.runs)))
    if not steps:
        return ""
    header = ["variant", *(f"step {step + 1}" for step in steps)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        cells = [v.name]
        for step in steps:
            seconds = statistics.fmean(r.seconds_at(step) for r in v.runs)
            cells.append(f"{_spread([r.curve[step] for r in v.runs], 3)} ({seconds:.0f} s)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_figure(variants: Sequence[Variant], path: Path) -> None:
    """Top: test quality per variant (each run a dot, the bar its mean), and validation
    scene_acc over steps and over training time. Bottom: training speed, attention FLOPs per
    caption split by part, and decoding time per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (quality, by_step, by_time), (training, flops, speed) = axes
    names = [v.name for v in variants]
    colours = {v.name: f"C{i}" for i, v in enumerate(variants)}
    width = 0.8 / max(len(variants), 1)
    scores = [name for name in QUALITY if name != "CIDEr"]  # the [0, 1] scores
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(scores))]
        means = [statistics.fmean(_column(v, QUALITY[n]) or [0.0]) for n in scores]
        quality.bar(xs, means, width, label=v.name, color=colours[v.name])
        for x, name in zip(xs, scores, strict=True):
            runs = _column(v, QUALITY[name])
            quality.plot([x] * len(runs), runs, "k.", markersize=4)
        for run in v.runs:
            steps = sorted(run.curve)
            values = [run.curve[step] for step in steps]
            by_step.plot(steps, values, "o-", color=colours[v.name], alpha=0.7)
            by_time.plot([run.seconds_at(s) for s in steps], values, "o-",
                         color=colours[v.name], alpha=0.7)  # fmt: skip
    quality.set_xticks(range(len(scores)), scores)
    quality.set_ylim(0, 1.05)
    quality.set_title("test quality (dots: runs)")
    quality.legend(fontsize=8, loc="lower left")
    for axis, label in ((by_step, "training step"), (by_time, "training seconds (mean pace)")):
        axis.set_xlabel(label)
        axis.set_ylim(0, 1.02)
        axis.set_title("validation scene_acc (a line per run)")
    speeds = [statistics.fmean(_column(v, TRAINING["train img/s"]) or [0.0]) for v in variants]
    training.bar(names, speeds, color=[colours[n] for n in names])
    training.set_title("training images/s (steps only)")
    bottom = [0.0] * len(variants)
    for part in PARTS:
        heights = [v.attention_flops[part] / 1e6 for v in variants]
        flops.bar(names, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    flops.set_title("attention MFLOP per caption")
    flops.legend(fontsize=8)
    lengths = sorted({n for v in variants for n in v.ms_per_token})
    for v in variants:
        speed.plot(lengths, [v.ms_per_token[n] for n in lengths], "o-", label=v.name,
                   color=colours[v.name])  # fmt: skip
    speed.set_xlabel("caption length (tokens)")
    speed.set_title("greedy decoding ms/token (batch 1, KV cache)")
    speed.set_ylim(bottom=0)
    speed.legend(fontsize=8)
    for axis in (training, flops):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def describe(variants: Sequence[Variant]) -> dict[str, Any]:
    """Everything in the table, as JSON."""
    return {
        v.name: {
            "runs": [str(run.folder) for run in v.runs],
            "params": v.params,
            "metrics": {name: _column(v, key) for name, key in {**QUALITY, **TRAINING}.items()},
            "val_scene_acc": [run.curve for run in v.runs],
            "ms_per_token": v.ms_per_token,
            "cache_bytes": v.cache_bytes,
            "attention_flops": v.attention_flops,
            "config": v.config.to_dict(),
        }
        for v in variants
    }
