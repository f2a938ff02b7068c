"""Scan a dataset for bad entries: python scripts/validate_data.py data=NAME [data.key=value ...].

Every image is decoded and every caption read; the report lists each bad entry, and the exit
status is 1 if there is any (2 for a malformed annotation file or a wrong config value).
"""

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

from captioner.cli import user_errors  # noqa: E402
from captioner.tasks import validate_data  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="validate_data")
def main(cfg: DictConfig) -> None:
    with user_errors():
        report, path = validate_data(cfg)
    console = Console()
    table = Table(title="dataset report")
    for column in ("split", "samples", "bad", "captions over max_len"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, counts in report["splits"].items():
        table.add_row(split, *(str(counts[k]) for k in ("samples", "bad", "long_captions")))
    console.print(table)
    for entry in report["bad"]:
        print(f"bad: {entry['source']}: {entry['reason']}")
    print(f"{len(report['bad'])} bad entries; report written to {path}")
    sys.exit(1 if report["bad"] else 0)


if __name__ == "__main__":
    main()
