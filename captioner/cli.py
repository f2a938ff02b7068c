"""What the scripts share: one-line errors instead of tracebacks, and the metrics table."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from captioner.errors import CheckpointError, ConfigError, DataError, TrainingError


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and exit status 2."""
    try:
        yield
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        sys.exit(2)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as err:
        print(f"training error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_status", 2))


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no less than `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return integer


def finite(text: str) -> float:
    """An argparse type: a finite number."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def print_metrics(metrics: dict[str, float], path: Path) -> None:
    """The metrics as a table, then where they were written."""
    table = Table(title="final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"metrics written to {path}")
