"""What a benchmark suite is: a measurement run on the command line's setting, shown as a table
and reported as JSON. `scripts/benchmark.py` runs those named by `--only`."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from captioner.core.models import CaptionerConfig


@dataclass
class Setting:
    """What a suite may read: the command line's options, the architecture of the preset with
    its overrides, the device, and how to compose more (the command line owns the configs)."""

    args: argparse.Namespace
    config: CaptionerConfig
    device: torch.device
    preset: Callable[[Sequence[str]], CaptionerConfig]  # the preset with more overrides
    train_config: Callable[[Sequence[str], Path], Any]  # a training run's config, writing there


@dataclass(frozen=True)
class Suite:
    """One benchmark. `show` gets every suite's rows too (a figure can be read against
    another's: the loader against the training step); `report` is its part of the JSON,
    given no rows when the suite did not run."""

    name: str
    run: Callable[[Setting], list[Any]]
    show: Callable[[Console, list[Any], dict[str, list[Any]]], None]
    report: Callable[[list[Any]], dict[str, Any]] | None = None
    default: bool = False  # run when --only is not given
    cpu_only: bool = False  # measures the CPU (loading, a store's build): never on a GPU

    def json(self, rows: list[Any]) -> dict[str, Any]:
        if self.report is not None:
            return self.report(rows)
        return {self.name: [dataclasses.asdict(row) for row in rows]}


def table(title: str, columns: Sequence[str], left: Sequence[str] = ()) -> Table:
    """A rich table with these columns, numbers right-aligned, the `left` ones left."""
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="left" if column in left else "right")
    return out
