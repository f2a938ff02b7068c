"""What the scripts share: one-line errors instead of tracebacks, a progress bar for terminals
only, and the metrics table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from captioner.core.errors import CheckpointError, ConfigError, DataError, TrainingError
from captioner.core.values import is_finite

KINDS = (
    (ConfigError, "config error"), (CheckpointError, "checkpoint error"),
    (DataError, "data error"), (TrainingError, "training error"),
)  # fmt: skip


@contextmanager
def user_errors(log_file: Path | None = None) -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr (and at the end of the run's
    `log_file`) and exit status 2."""
    try:
        yield
    except tuple(kind for kind, _ in KINDS) as err:
        line = next(f"{name}: {err}" for kind, name in KINDS if isinstance(err, kind))
        print(line, file=sys.stderr)
        if log_file is not None:
            with open(log_file, "a") as log:
                log.write(line + "\n")
        sys.exit(getattr(err, "exit_status", 2))


class OneLineParser(argparse.ArgumentParser):
    """An argument error in one line naming the option, not the whole usage first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(minimum: int, below: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer no less than `minimum` (and less than `below`)."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {value}")
        return value

    return integer


def finite(text: str) -> float:
    """An argparse type: a finite number."""
    value = float(text)
    if not is_finite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


@contextmanager
def progress(
    description: str, total: int, unit: str, show: bool = True
) -> Iterator[Callable[[], None]]:
    """A bar on stderr counting the `unit`s done of `total`, with their rate and the time left;
    yields the function that counts one more.

    Drawn only when stderr is a terminal (and `show`): piped or redirected, a run writes its
    results and nothing else, so its output stays machine-readable and its logs free of bars.
    While the bar is up, lines printed to the terminal appear above it; a stdout sent
    elsewhere is left alone.
    """
    if not (show and sys.stderr.isatty()):  # not rich's test, which FORCE_COLOR=1 turns on
        yield lambda: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        PaceColumn(unit),
        console=Console(stderr=True),
        redirect_stdout=sys.stdout.isatty(),
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


class PaceColumn(ProgressColumn):
    """Units a second since the start, and the time left at that pace: rich's own estimate
    reads a burst (a batch's results arrive all at once) as a huge rate."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if not task.completed or not elapsed:
            return Text(f"- {self.unit}/s, eta -", style="progress.remaining")
        rate = task.completed / elapsed
        if task.finished:
            took = timedelta(seconds=round(elapsed))
            return Text(f"{rate:.1f} {self.unit}/s, took {took}", style="progress.elapsed")
        left = timedelta(seconds=round((task.total - task.completed) / rate))
        return Text(f"{rate:.1f} {self.unit}/s, eta {left}", style="progress.remaining")


# what a paper's table shows, and grounding; the loss, per-layer and per-head figures and the
# rest stay in metrics.json (the table fits 80 columns)
HEADLINE = ("scene_acc", "CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "grounding/pointing_acc")
TOTALS = {
    "train/steps": "steps", "train/seconds": "s training", "train/images_per_s": "images/s",
    "model/params": "parameters", "data/skipped_samples": "bad samples skipped",
}  # fmt: skip


def print_metrics(
    metrics: dict[str, float], path: Path, log_file: Path | None = None, after: Sequence[str] = ()
) -> None:
    """The headline metrics, one row per split, then where all of them were written and the
    lines in `after`; the same text is appended to the run's `log_file`."""
    splits = sorted({k.split("/")[0] for k in metrics if k.split("/", 1)[-1] in HEADLINE})
    columns = [m for m in HEADLINE if any(f"{s}/{m}" in metrics for s in splits)]
    table = Table(title="headline metrics")
    table.add_column("split")
    for name in columns:
        table.add_column("pointing" if name == "grounding/pointing_acc" else name, justify="right")
    for split in splits:
        values = (metrics.get(f"{split}/{m}") for m in columns)
        table.add_row(split, *("" if v is None else f"{v:.3f}" for v in values))
    totals = ", ".join(f"{metrics[k]:,.6g} {name}" for k, name in TOTALS.items() if k in metrics)
    console = Console(record=True)
    if splits:
        console.print(table)
    lines = [totals] if totals else []
    for line in [*lines, f"all {len(metrics)} metrics written to {path}", *after]:
        console.print(line, highlight=False, soft_wrap=True)  # a path stays on one line
    if log_file is not None:
        with open(log_file, "a") as log:
            log.write(console.export_text())
