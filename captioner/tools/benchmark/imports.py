"""What `from captioner.inference import Captioner` costs before any caption: the wall time and
peak memory of a fresh process importing it, against one importing only what captioning itself
needs (torch, torchvision, PIL, safetensors), `--repeats` processes each, in turns."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from captioner.tools.benchmark.suite import Setting, Suite, table

FLOOR = "torch, torchvision, PIL, safetensors"
IMPORTS = {
    FLOOR: "import torch, torchvision, PIL.Image, safetensors.torch",
    "captioner.inference.Captioner": "from captioner.inference import Captioner",
}
_REPORT = (
    "; import json, resource, sys; print(json.dumps("
    "[resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(sys.modules)]))"
)


@dataclass
class ImportCost:
    """A fresh Python process that imports one thing and ends."""

    imports: str
    seconds: float  # median wall time of the whole process
    peak_mib: float  # median peak resident memory
    modules: int  # modules loaded by the end


def import_costs(repeats: int = 5) -> list[ImportCost]:
    """Each of `IMPORTS` in `repeats` fresh processes, the two taking turns."""
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in IMPORTS}
    for _ in range(repeats):
        for name, code in IMPORTS.items():
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", code + _REPORT], capture_output=True, text=True, check=True
            )
            seconds = time.perf_counter() - start
            peak_kib, modules = json.loads(out.stdout.splitlines()[-1])
            runs[name].append((seconds, peak_kib / 1024, modules))
    costs = []
    for name, rows in runs.items():
        seconds, peak = (statistics.median(r[i] for r in rows) for i in (0, 1))
        costs.append(ImportCost(name, seconds, peak, rows[-1][2]))
    return costs


def _run(setting: Setting) -> list[ImportCost]:
    return import_costs(setting.args.repeats)


def _show(console: Console, rows: list[ImportCost], _: dict[str, list[Any]]) -> None:
    floor = next(r for r in rows if r.imports == FLOOR)
    out = table(
        "a fresh process importing (medians)",
        ("imports", "seconds", f"/ {FLOOR}", "peak MiB", "modules"), ("imports",),
    )  # fmt: skip
    for r in rows:
        out.add_row(
            r.imports, f"{r.seconds:.2f}", f"{r.seconds / floor.seconds:.2f}x",
            f"{r.peak_mib:.0f}", str(r.modules),
        )  # fmt: skip
    console.print(out)


SUITE = Suite("imports", _run, _show, cpu_only=True)
