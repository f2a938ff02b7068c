"""Train a captioner: python scripts/train.py experiment=shapes [key=value ...]."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAPTIONER_ROOT", str(ROOT))

from captioner.errors import ConfigError  # noqa: E402
from captioner.tasks import train  # noqa: E402


def print_metrics(metrics: dict[str, float], path: Path) -> None:
    table = Table(title="final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"metrics written to {path}")


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        metrics, objects = train(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    print_metrics(metrics, objects["metrics_path"])


if __name__ == "__main__":
    main()
