"""Training runs side by side: python scripts/compare.py [NAME=]RUN_DIR... [--out FOLDER]

Each RUN_DIR is a training run's folder (it holds metrics.json and checkpoints/) or a folder
of runs, as a multirun makes (logs/train/multiruns/<time>). Runs of one architecture (seeds)
share a row, or, given a NAME, the runs under that RUN_DIR do (training recipes of one
architecture: scst=logs/scst/scst_mean ce=logs/scst/ce_more): quality as mean ± standard
deviation over them; training speed as each run recorded it; decoding ms/token, KV-cache
bytes and attention FLOPs measured now, for every row in turns in this one process. Writes
FOLDER/comparison.md, comparison.png and comparison.json, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from captioner.cli.console import user_errors
from captioner.core.files import write_text
from captioner.tools.compare import (
    curve_table,
    describe,
    find_runs,
    group_runs,
    load_run,
    markdown_table,
    measure_costs,
    named_paths,
    write_figure,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="output folder")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64], help="tokens")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure")
    args = parser.parse_args(argv)
    if min(args.lengths) < 2:
        parser.error("--lengths must be at least 2 tokens")
    with user_errors():
        variants = group_runs([
            load_run(folder, name)
            for name, path in named_paths(args.runs)
            for folder in find_runs([path])
        ])  # fmt: skip
    measure_costs(variants, tuple(args.lengths), args.repeats)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    table = markdown_table(variants)
    curves = curve_table(variants)
    if curves:
        table += (
            "\nValidation scene_acc at equal steps (mean training time to reach them):\n\n" + curves
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "comparison.md", f"{table}\nCosts measured on {machine}.\n")
    write_text(
        args.out / "comparison.json",
        json.dumps({"machine": machine, "variants": describe(variants)}, indent=2) + "\n",
    )
    write_figure(variants, args.out / "comparison.png")
    print(table)
    print(f"written to {args.out}/comparison.md, comparison.png, comparison.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
