"""The evaluation card `eval.py` writes beside `metrics.json`: what was scored, on what, how,
and with which code, so that two numbers can be compared, or one reproduced.

Papers' CIDEr differ from one another for reasons no metric file records: another checkpoint,
another test file, beam size, tokenizer or scorer version. The card records each of them.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from captioner.core.files import hash_file

PACKAGE = Path(__file__).resolve().parents[1]  # in a checkout, git finds its commit from here
SCORERS = ("torch", "pycocoevalcap", "lightning")


def data_files(config: dict[str, Any]) -> dict[str, str]:
    """{key: sha256} of every value of the data config that names a file (annotation files,
    split lists): what decides which images and references were scored."""
    return {
        key: hash_file(value).hexdigest()
        for key, value in sorted(config.items())
        if isinstance(value, str) and value and Path(value).is_file()
    }


def code_version() -> dict[str, Any]:
    """This package's version and, in a git checkout, its commit and whether it was edited."""
    version: dict[str, Any] = {"captioner": metadata.version("captioner")}
    try:
        git = ["git", "-C", str(PACKAGE)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    except OSError:  # no git
        return version
    if commit.returncode == 0:
        version["commit"] = commit.stdout.strip()
        version["uncommitted_changes"] = bool(status.stdout.strip())
    return version


def evaluation_card(
    checkpoint: Path,
    kind: str,
    data: dict[str, Any],
    splits: dict[str, int],
    decoding: dict[str, Any],
    tokenizer: str,
    java: bool,
) -> dict[str, Any]:
    """Everything that decides an evaluation's numbers, as JSON-able values."""
    return {
        "checkpoint": {
            "file": str(checkpoint),
            "kind": kind,
            "sha256": hash_file(checkpoint).hexdigest(),
        },
        "data": {"config": data, "files": data_files(data), "images_scored": splits},
        "decoding": decoding,
        "tokenizer": tokenizer,
        "left_out": [] if java else ["METEOR", "SPICE"],  # they run on Java
        "versions": {
            **code_version(),
            **{name: metadata.version(name) for name in SCORERS},
            "python": platform.python_version(),
        },
    }
