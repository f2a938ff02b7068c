"""Scan a dataset for bad entries: python scripts/validate_data.py data=NAME [data.key=value ...].

Every image is decoded and every caption read; the report lists each bad entry, and the exit
status is 1 if there is any (2 for a malformed annotation file or a wrong config value).
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from captioner.cli.app import run


def validate(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from captioner.training.tasks import validate_data  # the package (torch) only once a run starts

    report, path = validate_data(cfg)
    table = Table(title="dataset report")
    for column in ("split", "samples", "bad", "captions over max_len"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, counts in report["splits"].items():
        table.add_row(split, *(str(counts[k]) for k in ("samples", "bad", "long_captions")))
    Console().print(table)
    for entry in report["bad"]:
        print(f"bad: {entry['source']}: {entry['reason']}")
    print(f"{len(report['bad'])} bad entries; report written to {path}")
    sys.exit(1 if report["bad"] else 0)


def main() -> None:
    run("validate_data", validate, __doc__)


if __name__ == "__main__":
    main()
