"""The fusion comparison as users run it: one multirun, then `scripts/compare.py` on its folder."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.core.errors import DataError
from captioner.tools.compare import Run, Variant, find_runs, group_runs, markdown_table, named_paths
from tests.helpers import ROOT, tiny_config

TINY_RUN = (
    "experiment=shapes_tiny", "data.num_train=64", "data.num_val=16", "data.num_test=16",
    "data.batch_size=16", "trainer.max_epochs=1", "callbacks.lr_monitor=null",
    "callbacks.rich_progress_bar=null", "callbacks.attention_samples=null",
)  # fmt: skip


@pytest.mark.slow
def test_a_multirun_of_fusions_becomes_one_table_and_figure(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "CAPTIONER_ROOT": str(tmp_path / "root")}
    trained = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *TINY_RUN,
         "model/decoder=cross,prefix", "seed=1,2", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    runs = find_runs([sweep])
    assert len(runs) == 4
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["train/images_per_s"] > 0 and metrics["model/params"] > 0
        assert metrics["train/steps"] == 4  # 64 images in batches of 16

    out = tmp_path / "comparison"
    compared = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), str(sweep), "--out", str(out),
         "--lengths", "2", "4", "--repeats", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-3000:]
    table = (out / "comparison.md").read_text()
    main, curves = table.split("equal steps")  # the comparison, then the validation curves
    rows = [line for line in main.splitlines() if line.startswith(("| cross", "| prefix"))]
    assert [row.split(" | ")[:2] for row in rows] == [["| cross", "2"], ["| prefix", "2"]]
    assert "| step 4 |" in curves and "| cross | 0." in curves
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((out / "comparison.json").read_text())["variants"]
    for name, variant in report.items():
        scores = [json.loads((Path(r) / "metrics.json").read_text()) for r in variant["runs"]]
        assert variant["metrics"]["scene_acc"] == [s["test/scene_acc"] for s in scores]
        assert variant["params"] == scores[0]["model/params"]  # what training counted
        assert variant["config"]["decoder"]["kind"] == name
        assert [list(curve) for curve in variant["val_scene_acc"]] == [["3"], ["3"]]
        mean = statistics.fmean(variant["metrics"]["scene_acc"])
        assert f"{mean:.3f} ± " in next(row for row in rows if row.startswith(f"| {name} "))
    prefix, cross = report["prefix"], report["cross"]
    # both keep keys and values of every image token in every layer: the same cache
    assert prefix["cache_bytes"] == cross["cache_bytes"] > 0
    assert prefix["attention_flops"]["encoder"] == cross["attention_flops"]["encoder"]
    assert prefix["attention_flops"]["image_reading"] > cross["attention_flops"]["image_reading"]


def test_a_folder_without_runs_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such run folder"):
        find_runs([tmp_path / "missing"])
    with pytest.raises(DataError, match="no metrics.json"):
        find_runs([tmp_path])


def test_one_run_shows_its_value_without_a_spread() -> None:
    variant = Variant("cross", tiny_config(), params=1000, cache_bytes=2048)
    variant.ms_per_token = {16: 1.0}
    variant.attention_flops = {"encoder": 10**6, "decoder_self": 0, "image_reading": 0}
    table = markdown_table([variant])
    assert "| cross | 0 | 0.00 | – |" in table  # no runs: no scores, never a made-up one


def test_named_run_folders_are_rows_of_their_own(tmp_path: Path) -> None:
    """Training recipes of one architecture (cross-entropy, SCST) get a row each when named;
    unnamed runs of that architecture still share one."""
    (tmp_path / "a=b").mkdir()
    assert named_paths(["scst=logs/x", "logs/y", f"{tmp_path}/a=b", "not a name=z"]) == [
        ("scst", Path("logs/x")), (None, Path("logs/y")), (None, tmp_path / "a=b"),
        (None, Path("not a name=z")),
    ]  # fmt: skip
    config = tiny_config()
    runs = [
        Run(tmp_path / str(i), {}, config, name=name)
        for i, name in enumerate(["scst", "ce", "scst", None, None])
    ]
    variants = group_runs(runs)
    assert [(v.name, len(v.runs)) for v in variants] == [("scst", 2), ("ce", 1), ("cross", 2)]
    other = Run(tmp_path / "9", {}, tiny_config(decoder="prefix"), name="ce")
    with pytest.raises(DataError, match="architecture differs from the other runs named 'ce'"):
        group_runs([*runs, other])


def test_unnamed_rows_never_take_a_name_already_in_the_table(tmp_path: Path) -> None:
    """Row names key the measured costs and comparison.json: an unnamed architecture whose
    label a named row (or another unnamed architecture) already holds gets a number."""
    wide = tiny_config(decoder_dim=32)
    runs = [
        Run(tmp_path / "0", {}, tiny_config()), Run(tmp_path / "1", {}, wide),
        Run(tmp_path / "2", {}, tiny_config(), name="cross"),
        Run(tmp_path / "3", {}, tiny_config(decoder="prefix"), name="cross #2"),
        Run(tmp_path / "4", {}, tiny_config()),
    ]  # fmt: skip
    variants = group_runs(runs)
    names = [(v.name, [r.folder.name for r in v.runs]) for v in variants]
    assert names == [("cross #3", ["0", "4"]), ("cross #4", ["1"]), ("cross", ["2"]),
                     ("cross #2", ["3"])]  # fmt: skip
